"""Cache format 2 (chunks packed in shards): `cache migrate` from format 1, and verify naming
an inner chunk of a shard."""

from __future__ import annotations

import shutil

import google_crc32c
import numpy as np
import pytest
from click.testing import CliRunner

from offroad_seg.cli import cli
from offroad_seg.features import migrate as migrate_module
from offroad_seg.features.cache import FeatureCache
from offroad_seg.features.chunk_store import INDEX_ENTRY_BYTES
from offroad_seg.features.extract import extract
from tests.conftest import extract_config


@pytest.fixture(scope="module")
def v1_int8(dataset, tmp_path_factory):
    """A format-1 int8 cache with a flip view, one image per chunk (6 chunk files per array)."""
    path = tmp_path_factory.mktemp("v1") / "v1.zarr"
    cfg = extract_config(
        dataset / "train",
        path,
        views=("identity", "hflip"),
        dtype="int8",
        images_per_chunk=1,
        cache_version=1,
    )
    extract(cfg)
    return path


def arrays(path) -> dict[str, np.ndarray]:
    cache = FeatureCache.open(path)
    stored, labels = cache.load_stored()
    return {
        "values": stored.values,
        "scales": stored.scales,
        "labels": labels,
        "hackathon": cache.hackathon_labels(),
        "done": cache.done(),
        "class_pixels": cache.class_pixels(),
    }


def files(path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file())


def test_migrate_v1_to_v2_keeps_every_array_and_survives_interruption(
    v1_int8, tmp_path, monkeypatch
):
    path = tmp_path / "c.zarr"
    shutil.copytree(v1_int8, path)
    before, files_before = arrays(path), files(path)
    # interrupted after the first array's metadata switched: the cache reads as before
    real = migrate_module._switch_metadata
    calls = []

    def stop_after_first(*args):
        if calls:
            raise KeyboardInterrupt
        calls.append(args)
        real(*args)

    monkeypatch.setattr(migrate_module, "_switch_metadata", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        migrate_module.migrate(path, chunks_per_shard=4)
    monkeypatch.setattr(migrate_module, "_switch_metadata", real)
    half = arrays(path)
    for name, value in before.items():
        np.testing.assert_array_equal(half[name], value, err_msg=name)
    assert FeatureCache.open(path).array("done").shards == (4,)  # switched
    assert FeatureCache.open(path).array("features").shards is None  # not yet
    # the rerun (the CLI) keeps the interrupted run's 4 chunks per shard and finishes
    r = CliRunner().invoke(cli, ["cache", "migrate", str(path), "--chunks-per-shard", "3"])
    assert r.exit_code == 0, r.output
    assert "now cache format 2" in r.output and "4 chunks per shard" in r.output
    after = arrays(path)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    cache = FeatureCache.open(path)
    assert cache.spec.version == 2 and cache.spec.chunks_per_shard == 4
    assert cache.array("features").shards == (4, 1, 384, 4, 7)
    assert cache.spec.fingerprint == FeatureCache.open(v1_int8).spec.fingerprint
    report = cache.verify(progress=False)
    assert report.ok, report.problems
    assert not (path / "features" / "c").exists() and not (path / ".offroad-seg-migrate").exists()
    # 6 chunks per data array became 2 shards; both views: labels, features, scales
    assert files(path) < files_before - 20
    r = CliRunner().invoke(cli, ["cache", "migrate", str(path)])
    assert r.exit_code == 0 and "already cache format 2" in r.output


@pytest.fixture(scope="module")
def v2(dataset, tmp_path_factory):
    """A format-2 cache of 6 one-image chunks, 3 per shard (2 shards per array and view)."""
    path = tmp_path_factory.mktemp("v2") / "v2.zarr"
    extract(extract_config(dataset / "train", path, images_per_chunk=1, chunks_per_shard=3))
    return path


def swap_index_entries(shard, a: int, b: int, per_shard: int) -> None:
    """Swap two inner chunks of a shard by swapping their index entries (and re-signing the
    index): each chunk still passes its own checksum."""
    raw = bytearray(shard.read_bytes())
    start = len(raw) - per_shard * INDEX_ENTRY_BYTES - 4
    index = np.frombuffer(bytes(raw[start:-4]), "<u8").reshape(per_shard, 2).copy()
    index[[a, b]] = index[[b, a]]
    table = index.tobytes()
    raw[start:] = table + google_crc32c.value(table).to_bytes(4, "little")
    shard.write_bytes(bytes(raw))


def test_verify_names_swapped_and_corrupted_inner_chunks(v2, tmp_path):
    path = tmp_path / "c.zarr"
    shutil.copytree(v2, path)
    assert FeatureCache.open(path).verify(progress=False).ok
    swap_index_entries(path / "features" / "c.0.0.0.0.0", 0, 2, per_shard=3)
    shard = path / "labels" / "c.1.0.0.0"  # images 3-5
    raw = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(raw[-3 * INDEX_ENTRY_BYTES - 4 : -4]), "<u8").reshape(3, 2)
    offset, length = map(int, index[1])  # inner chunk 1: image 4
    raw[offset + length // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    report = FeatureCache.open(path).verify(progress=False)
    problems = "\n".join(report.problems)
    assert len(report.problems) == 3, problems
    assert (
        "features chunk (0, 0, 0, 0, 0): holds the data of features chunk (2, 0, 0, 0, 0) "
        "(features/c.0.0.0.0.0, inner chunk 0)" in problems
    )
    assert "features chunk (2, 0, 0, 0, 0): holds the data of features chunk (0, 0, 0, 0, 0)" in (
        problems
    )
    assert "labels chunk (4, 0, 0, 0): unreadable (labels/c.1.0.0.0, inner chunk 1)" in problems
    with pytest.raises(Exception, match="swapped or moved"):
        FeatureCache.open(path).load()


def test_streaming_uses_each_image_once_per_epoch_and_ranks_read_their_own_shards(
    dataset, tmp_path
):
    import torch

    from offroad_seg.core.distributed import SINGLE, World
    from offroad_seg.training.sources import StreamingSource

    path = tmp_path / "flip.zarr"
    cfg = extract_config(
        dataset / "train", path, views=("identity", "hflip"), images_per_chunk=1, chunks_per_shard=2
    )
    extract(cfg)
    cache = FeatureCache.open(path)
    feats, labels = cache.load()
    source = StreamingSource([cache], torch.device("cpu"), window=2)  # a 2-image buffer
    assert source.units == [(0, 0, 2), (0, 2, 4), (0, 4, 6)]  # whole shards

    def epoch(seed, world=SINGLE):
        plan, _ = source.epoch_plan(seed, 1, 2, world)
        got = list(source.batches(seed, 1, 2, world))
        f, lab = torch.cat([b[0] for b in got]), torch.cat([b[1] for b in got])
        expected = torch.from_numpy(feats[plan[:, 1], plan[:, 2]].astype(np.float32))
        torch.testing.assert_close(f, expected, rtol=0, atol=0)
        np.testing.assert_array_equal(lab.numpy(), labels[plan[:, 1], plan[:, 2]])
        return plan

    plan = epoch(seed=3)
    assert sorted(plan[:, 1]) == list(range(6))  # each image exactly once
    np.testing.assert_array_equal(epoch(seed=3), plan)  # deterministic given the seed
    assert not np.array_equal(epoch(seed=4)[:, 1], plan[:, 1])
    # two ranks: disjoint parts covering the epoch, each from its own shards (cut at most
    # inside one shard)
    parts = [epoch(seed=3, world=World(rank=r, size=2)) for r in range(2)]
    assert sorted(np.concatenate([p[:, 1] for p in parts])) == list(range(6))
    segments = [source.rank_segments(3, 1, 2, World(rank=r, size=2))[0] for r in range(2)]
    assert sum(stop - start for _, start, stop in segments[0]) == 3
    shards = [
        {start // 2 for _, start, _ in s} | {(stop - 1) // 2 for _, _, stop in s} for s in segments
    ]
    assert len(shards[0] & shards[1]) <= 1
