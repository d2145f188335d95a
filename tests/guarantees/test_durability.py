"""Power-loss durability of local caches: chunk files (and the folders zarr renames them into)
are fsynced before the `done` flags that vouch for them are written, and everything `complete`
vouches for is fsynced before it. Checked by recording the fsync and write calls in order."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from offroad_seg.core import storage
from offroad_seg.features.cache import FeatureCache
from offroad_seg.features.extract import extract
from tests.conftest import extract_config


class Recorder:
    """fsync calls (resolved to paths) and zarr's local writes, in the order they happen."""

    def __init__(self, monkeypatch) -> None:
        import zarr.storage._local as local

        self.events: list[tuple[str, str, bytes]] = []
        self.lock = threading.Lock()
        real_fsync, real_put = os.fsync, local._put

        def fsync(fd: int) -> None:
            real_fsync(fd)
            self.add("fsync", os.readlink(f"/proc/self/fd/{fd}"), b"")

        def put(path, value, exclusive=False):
            written = real_put(path, value, exclusive=exclusive)
            self.add("put", str(path), bytes(value.to_bytes()))
            return written

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(local, "_put", put)

    def add(self, kind: str, path: str, data: bytes) -> None:
        with self.lock:
            self.events.append((kind, os.path.realpath(path), data))

    def synced_before(self, i: int) -> set[str]:
        return {p for kind, p, _ in self.events[:i] if kind == "fsync"}


def chain(root: Path, key: str) -> list[str]:
    """A chunk file and every folder from its own up to the cache root."""
    path = (root / key).resolve()
    out = [str(path)]
    while path != root.resolve():
        path = path.parent
        out.append(str(path))
    return out


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="resolves fds through /proc")
def test_sync_files_syncs_files_then_their_folders_up_to_the_root(tmp_path, monkeypatch):
    root = tmp_path / "c.zarr"
    keys = ["features/c/0/0/0/0/0", "features/c/0/1/0/0/0", "labels/c/0/0/0/0", "zarr.json"]
    for key in keys:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(b"x")
    rec = Recorder(monkeypatch)
    storage.sync_files(root, keys)
    synced = [p for kind, p, _ in rec.events if kind == "fsync"]
    files = {str((root / k).resolve()) for k in keys}
    assert set(synced[: len(keys)]) == files  # the files first
    folders = synced[len(keys) :]
    expected = {p for k in keys for p in chain(root, k)} - files
    assert set(folders) == expected and len(folders) == len(expected)  # each folder once
    depth = [len(Path(p).parts) for p in folders]
    assert depth == sorted(depth, reverse=True)  # deepest first, the root last
    assert folders[-1] == str(root.resolve())
    # object stores: nothing to sync, nothing opened
    rec.events.clear()
    storage.sync_files("memory://x/c.zarr", keys)
    storage.sync_files("s3://bucket/c.zarr", keys)
    assert rec.events == []


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="resolves fds through /proc")
def test_done_flags_follow_the_fsync_of_their_chunks(dataset, tmp_path, monkeypatch):
    cache_path = tmp_path / "c.zarr"
    rec = Recorder(monkeypatch)
    extract(
        extract_config(
            dataset / "train",
            cache_path,
            views=("identity", "hflip"),
            batch_size=2,
            images_per_chunk=1,
            cache_version=1,  # a file per chunk and per done flag: each put is seen
        )
    )
    cache = FeatureCache.open(cache_path)
    assert cache.complete and cache.done().all()
    root = cache_path.resolve()
    done_puts = [
        (i, int(Path(p).name))
        for i, (kind, p, _) in enumerate(rec.events)
        if kind == "put" and Path(p).parent == root / "done" / "c"
    ]
    assert sorted(c for _, c in done_puts) == list(range(cache.num_chunks))
    for i, chunk in done_puts:
        before = rec.synced_before(i)
        for key in cache.chunk_keys(chunk):  # features and labels of both views
            missing = set(chain(cache_path, key)) - before
            assert not missing, f"done[{chunk}] written before {sorted(missing)} were synced"
    # one fsync pass per batch: a batch's two chunks are marked done together, after both
    # were synced (the first done flag of a batch already needs the second chunk's files)
    for i, chunk in done_puts:
        partner = chunk ^ 1
        if partner < cache.num_chunks:
            assert str((cache_path / cache.chunk_keys(partner)[0]).resolve()) in (
                rec.synced_before(i)
            )
    # finalize: `complete` reaches the disk after the done flags and histogram it vouches for
    complete = [
        i
        for i, (kind, p, data) in enumerate(rec.events)
        if kind == "put" and p == str(root / "zarr.json") and b'"complete": true' in data
    ]
    assert complete
    before = rec.synced_before(complete[0])
    vouched = [f"done/c/{c}" for c in range(cache.num_chunks)] + ["class_pixels/c/0"]
    vouched += [f"{a}/zarr.json" for a in ("features", "labels", "done", "names")]
    assert {str((cache_path / k).resolve()) for k in vouched} <= before
    after = {p for kind, p, _ in rec.events[complete[0] :] if kind == "fsync"}
    assert str(root / "zarr.json") in after and str(root) in after


def test_chunks_written_before_a_failure_are_committed(dataset, tmp_path, monkeypatch):
    """A failed write stops the run, but the chunks already whole are synced and marked done:
    the error message's count of safely stored images is true."""
    cache_path = tmp_path / "c.zarr"
    real = FeatureCache.write_unit_data  # format 1: a unit is a chunk
    written = []

    def fail_third(self, chunk, *a, **kw):
        if len(written) == 2 and 2 not in written:
            written.append(2)
            raise RuntimeError("simulated failure")
        real(self, chunk, *a, **kw)
        written.append(chunk)

    monkeypatch.setattr(FeatureCache, "write_unit_data", fail_third)
    committed = []
    real_commit = FeatureCache.commit_chunks
    monkeypatch.setattr(
        FeatureCache,
        "commit_chunks",
        lambda self, chunks: (committed.extend(chunks), real_commit(self, chunks)),
    )
    cfg = extract_config(
        dataset / "train", cache_path, batch_size=4, images_per_chunk=1, cache_version=1
    )
    with pytest.raises(RuntimeError, match="simulated failure"):
        extract(cfg)
    # every chunk whose write finished (queued writes go on after the failure) and only those
    assert 0 in committed and 1 in committed and 2 not in committed
    assert sorted(committed) == sorted(c for c in written if c != 2)
    done = FeatureCache.open(cache_path).done()
    assert [bool(done[c]) for c in range(len(done))] == [c in committed for c in range(len(done))]
