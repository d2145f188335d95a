"""Issue #21, the feature cache: extract never clears a folder it did not create, an interrupted
creation is redone by a rerun, chunks are tied to their positions, the sources digest notices
edits, damaged metadata and remote storage faults are one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from offroad_seg.errors import CacheError
from offroad_seg.features.cache import FeatureCache
from offroad_seg.features.cache_folder import MARKER
from offroad_seg.features.extract import extract
from tests.conftest import extract_config

from .test_bad_input import assert_one_line_error, make_dataset, run

H, W = 28, 42
ARGS = ["--weights", "random", "--size", f"{H}x{W}", "--workers", "0", "--images-per-chunk", "2"]


@pytest.fixture(scope="module", autouse=True)
def backbone_built_once():
    """Every in-process extract here reuses one random backbone (building it costs seconds)."""
    import offroad_seg.features.extract as module

    real, built = module.load_backbone, {}

    def load(weights, layers=1, device=None, name=None):
        key = (str(weights), layers, str(device), name)
        if key not in built:
            built[key] = real(weights, layers=layers, device=device, name=name)
        return built[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "load_backbone", load)
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("guard") / "train", n=3)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The same extraction as ARGS, never interrupted."""
    cache = tmp_path_factory.mktemp("ref") / "ref.zarr"
    extract(config(data, cache))
    return cache


def config(data: Path, cache, **kw):
    return extract_config(data, cache, size=(H, W), images_per_chunk=2, **kw)


def files(folder: Path) -> dict[str, bytes]:
    """Every file under a cache, by relative path; the root zarr.json without its finishing
    time (the one thing two runs may differ in)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = p.read_bytes()
    meta = json.loads(out["zarr.json"])
    meta["attributes"].pop("finished")
    out["zarr.json"] = json.dumps(meta, sort_keys=True).encode()
    return out


def assert_byte_identical(a: Path, b: Path) -> None:
    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb)
    for key in fa:
        assert fa[key] == fb[key], key


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- 1: never clear


def test_folder_with_a_user_file_is_refused_even_with_overwrite(data, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        result = run("extract", data, victim, *ARGS, *extra)
        assert_one_line_error(result, "victim", "not an offroad-seg feature cache", "notes.txt")
        assert sorted(p.name for p in victim.iterdir()) == ["notes.txt"]
        assert (victim / "notes.txt").read_text() == "mine"


def test_cache_folder_equal_to_inside_or_holding_the_data_is_refused(data, tmp_path):
    dcopy = tmp_path / "dcopy"
    shutil.copytree(data, dcopy)
    before = tree(dcopy)
    for out, words in [
        (dcopy, "is the data folder"),
        (dcopy / "c.zarr", "is inside the data folder"),
        (dcopy / "Segmentation" / "c.zarr", "is inside the data folder"),
        (tmp_path, "holds the data folder"),
    ]:
        result = run("extract", dcopy, out, *ARGS, "--overwrite")
        assert_one_line_error(result, str(out), words)
        assert tree(dcopy) == before
    assert not (dcopy / "c.zarr").exists()


def test_extract_into_the_working_directory_is_refused(data, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "paper.tex").write_text("draft")
    monkeypatch.chdir(work)
    result = run("extract", data, ".", *ARGS, "--overwrite")
    assert_one_line_error(result, "not an offroad-seg feature cache", "paper.tex")
    assert sorted(p.name for p in work.iterdir()) == ["paper.tex"]


def test_a_foreign_zarr_store_is_refused(data, tmp_path):
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w").create_array("x", shape=(2,), dtype="int8")
    before = tree(other)
    result = run("extract", data, other, *ARGS, "--overwrite")
    assert_one_line_error(result, "other.zarr", "not an offroad-seg feature cache")
    assert tree(other) == before


def test_overwrite_of_our_cache_replaces_only_its_own_entries(data, reference, tmp_path):
    cache = tmp_path / "c.zarr"
    shutil.copytree(reference, cache)
    (cache / "notes.txt").write_text("mine")
    zarr.open_group(str(cache), mode="r+")["done"][0] = False  # something for --overwrite to redo
    result = run("extract", data, cache, *ARGS, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (cache / "notes.txt").read_text() == "mine"
    (cache / "notes.txt").unlink()
    assert_byte_identical(cache, reference)


def test_empty_folder_is_used(data, reference, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("extract", data, empty, *ARGS).exit_code == 0
    assert_byte_identical(empty, reference)


# --------------------------------------------------------------------------- 8: creation


class Crash(BaseException):
    """Stands for a kill: nothing of ours catches it (extract converts only OSError)."""


def creation_writes(data: Path, tmp_path: Path, monkeypatch) -> list[str]:
    """The files an uninterrupted creation writes through zarr, in order (up to the first
    feature chunk)."""
    import zarr.storage._local as local

    real_put = local._put
    seen: list[str] = []

    def record(path, value, exclusive=False):
        if "/features/c" in str(path):  # a chunk (format 1) or a shard (format 2)
            raise Crash
        seen.append(str(Path(path).relative_to(tmp_path / "probe.zarr")))
        return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", record)
    with pytest.raises(Crash):
        extract(config(data, tmp_path / "probe.zarr"))
    monkeypatch.setattr(local, "_put", real_put)
    return seen


def test_crash_at_every_creation_step_then_rerun_is_identical(
    data, reference, tmp_path, monkeypatch
):
    import zarr.storage._local as local

    from offroad_seg.core import storage

    writes = creation_writes(data, tmp_path, monkeypatch)
    assert writes[0] == "zarr.json" and writes[-1] == "zarr.json"  # attributes last
    assert len(writes) >= 8
    real_put = local._put
    for step in range(len(writes)):
        cache = tmp_path / f"c{step}.zarr"
        calls = {"n": 0}

        def crash_at(path, value, exclusive=False, step=step, calls=calls):
            if calls["n"] == step:
                raise Crash
            calls["n"] += 1
            return real_put(path, value, exclusive=exclusive)

        monkeypatch.setattr(local, "_put", crash_at)
        with pytest.raises(Crash):
            extract(config(data, cache))
        monkeypatch.setattr(local, "_put", real_put)
        assert (cache / MARKER).exists(), writes[step]
        # every reader says what to do, in one line
        with pytest.raises(CacheError, match="creation was interrupted; rerun the same"):
            FeatureCache.open(cache)
        result = run("extract", data, cache, *ARGS)
        assert result.exit_code == 0, (writes[step], result.output)
        assert not (cache / MARKER).exists()
        assert_byte_identical(cache, reference)

    # killed after the attributes, before the marker went: the cache is whole; rerun finishes
    real_delete = storage.delete_entries
    cache = tmp_path / "last.zarr"

    def crash_on_marker(path, names):
        if list(names) == [MARKER]:
            raise Crash
        return real_delete(path, names)

    monkeypatch.setattr(storage, "delete_entries", crash_on_marker)
    with pytest.raises(Crash):
        extract(config(data, cache))
    monkeypatch.setattr(storage, "delete_entries", real_delete)
    assert (cache / MARKER).exists() and FeatureCache.open(cache).complete is False
    assert run("extract", data, cache, *ARGS).exit_code == 0
    assert not (cache / MARKER).exists()
    assert_byte_identical(cache, reference)


def test_disk_full_while_creating_is_one_line_then_rerun_recovers(
    data, reference, tmp_path, monkeypatch
):
    import zarr.storage._local as local

    real_put = local._put

    def full_at_names(path, value, exclusive=False):
        if "/names/c/" in str(path):  # names: one unsharded chunk in both formats
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_put(path, value, exclusive=exclusive)

    cache = tmp_path / "c.zarr"
    monkeypatch.setattr(local, "_put", full_at_names)
    result = run("extract", data, cache, *ARGS)
    assert_one_line_error(result, "names", "No space left on device", "rerun")
    monkeypatch.setattr(local, "_put", real_put)
    assert run("extract", data, cache, *ARGS).exit_code == 0
    assert_byte_identical(cache, reference)


KILL_AT_PUT = """
import os, sys
import zarr.storage._local as local
real, calls = local._put, {"n": 0}
def put(path, value, exclusive=False):
    calls["n"] += 1
    if calls["n"] == int(os.environ["KILL_AT"]):
        os._exit(137)
    return real(path, value, exclusive=exclusive)
local._put = put
from offroad_seg.cli import main
sys.argv = ["offroad-seg", *sys.argv[1:]]
main()
"""


def test_process_killed_while_creating_then_rerun_is_identical(data, reference, tmp_path):
    cache = tmp_path / "c.zarr"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_AT_PUT, "extract", str(data), str(cache), *ARGS],
        env={**os.environ, "KILL_AT": "5"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 137, proc.stderr
    assert (cache / MARKER).exists() and (cache / "zarr.json").exists()
    assert run("cache", "info", cache).exit_code == 1
    assert run("extract", data, cache, *ARGS).exit_code == 0
    assert_byte_identical(cache, reference)


# --------------------------------------------------------------------------- 11: temp files


def test_a_dead_writers_temp_files_are_removed_by_the_next_run(data, reference, tmp_path):
    import socket

    from offroad_seg.core.atomic import _TEMP

    cache = tmp_path / "c.zarr"
    cache.mkdir()
    host = socket.gethostname()
    dead = cache / f".{MARKER}.{host}-999999999.0123abcd.tmp"
    assert _TEMP.match(dead.name)
    dead.write_text("{}")
    partial = cache / "zarr.0123456789abcdef0123456789abcdef.partial"
    partial.write_text("{}")
    assert run("extract", data, cache, *ARGS).exit_code == 0
    assert not dead.exists() and not partial.exists()
    assert_byte_identical(cache, reference)


# --------------------------------------------------------------------------- 7a: positions


def copy_of(reference: Path, tmp_path: Path, name: str = "c.zarr") -> Path:
    cache = tmp_path / name
    shutil.copytree(reference, cache)
    return cache


def swap(a: Path, b: Path) -> None:
    da, db = a.read_bytes(), b.read_bytes()
    assert da != db
    a.write_bytes(db)
    b.write_bytes(da)


def test_swapped_chunks_are_named_by_verify_and_train(data, tmp_path):
    """Format 1 (a file per chunk); format 2's inner chunks: tests/features/test_shards.py."""
    cache = tmp_path / "c.zarr"
    extract(config(data, cache, cache_version=1))
    swap(cache / "features/c/0/0/0/0/0", cache / "features/c/1/0/0/0/0")
    swap(cache / "labels/c/0/0/0/0", cache / "labels/c/1/0/0/0")
    # each chunk still passes its own checksum
    assert FeatureCache.open(cache).verify(progress=False).problems == [
        "features chunk (0, 0, 0, 0, 0): holds the data of features chunk (1, 0, 0, 0, 0) "
        "(features/c/0/0/0/0/0); chunks were swapped or moved",
        "labels chunk (0, 0, 0, 0): holds the data of labels chunk (1, 0, 0, 0) "
        "(labels/c/0/0/0/0); chunks were swapped or moved",
        "features chunk (1, 0, 0, 0, 0): holds the data of features chunk (0, 0, 0, 0, 0) "
        "(features/c/1/0/0/0/0); chunks were swapped or moved",
        "labels chunk (1, 0, 0, 0): holds the data of labels chunk (0, 0, 0, 0) "
        "(labels/c/1/0/0/0); chunks were swapped or moved",
    ]
    result = run("cache", "verify", cache)
    assert_one_line_error(result, "4 problems")
    assert "features chunk (0, 0, 0, 0, 0): holds the data of features chunk (1" in result.stderr
    result = run("train", cache, tmp_path / "h", "--epochs", "1")
    assert_one_line_error(
        result, "c.zarr", "damaged cache", "features chunk (0, 0, 0, 0, 0): holds the data of"
    )
    assert not (tmp_path / "h" / "segmentation_head.pth").exists()


def test_a_cache_without_position_checksums_still_verifies_and_trains(reference, tmp_path):
    """Caches written before chunk_checksums existed (format version 1 all the same)."""
    cache = copy_of(reference, tmp_path)
    shutil.rmtree(cache / "chunk_checksums")
    old = FeatureCache.open(cache)
    assert not old.has_checksums and old.verify(progress=False).ok
    result = run("train", cache, tmp_path / "h", "--epochs", "1")
    assert result.exit_code == 0, result.output


# --------------------------------------------------------------------------- 7b: sources


def unfinished_copy(reference: Path, tmp_path: Path) -> Path:
    cache = copy_of(reference, tmp_path)
    g = zarr.open_group(str(cache), mode="r+")
    g["done"][2] = False
    g.update_attributes({"complete": False})
    return cache


def test_a_mask_edited_to_the_same_size_is_noticed_on_resume(data, reference, tmp_path):
    dcopy = tmp_path / "d"
    shutil.copytree(data, dcopy)  # keeps mtimes: the reference's digest still matches
    cache = unfinished_copy(reference, tmp_path)
    assert run("extract", dcopy, cache, *ARGS).exit_code == 0  # resumes: same sources
    cache = unfinished_copy(reference, tmp_path / "again")
    mask = sorted((dcopy / "Segmentation").iterdir())[1]
    raw = bytearray(mask.read_bytes())
    raw[-20] ^= 0xFF
    mask.write_bytes(bytes(raw))  # the same size, other content
    result = run("extract", dcopy, cache, *ARGS)
    assert_one_line_error(
        result, "made with other settings (the cache vs this run: image files)", "--overwrite"
    )


def test_a_cache_with_the_old_size_only_digest_still_resumes(data, reference, tmp_path):
    from offroad_seg.data.dataset import list_samples
    from offroad_seg.data.digest import sources_digest
    from offroad_seg.features.cache_format import CacheSpec

    cache = unfinished_copy(reference, tmp_path)
    g = zarr.open_group(str(cache), mode="r+")
    attrs = dict(g.attrs)
    entries = [(s.name, s.image, s.mask) for s in list_samples(data)]
    attrs["sources_digest"] = sources_digest(entries, "size")
    del attrs["sources_method"]
    names = [str(s) for s in g["names"][:]]
    attrs["fingerprint"] = CacheSpec.from_attributes(attrs, names).fingerprint
    g.attrs.put(attrs)
    assert FeatureCache.open(cache).spec.sources_method == "size"
    result = run("extract", data, cache, *ARGS)
    assert result.exit_code == 0 and "extracted 1 of 3 images" in result.stdout, result.output
    assert FeatureCache.open(cache).verify(progress=False).ok


# --------------------------------------------------------------------------- 7e: metadata


def test_class_names_swapped_in_the_metadata_stop_train(reference, tmp_path):
    cache = copy_of(reference, tmp_path)
    meta = json.loads((cache / "zarr.json").read_text())
    classes = meta["attributes"]["class_map"]
    classes[1]["name"], classes[2]["name"] = classes[2]["name"], classes[1]["name"]
    (cache / "zarr.json").write_text(json.dumps(meta))
    problems = FeatureCache.open(cache).verify(progress=False).problems
    assert problems == ["attributes: stored fingerprint does not match the cache's settings"]
    result = run("train", cache, tmp_path / "h", "--epochs", "1")
    assert_one_line_error(
        result, "c.zarr/zarr.json", "do not match their stored fingerprint", "class map"
    )
    assert not (tmp_path / "h" / "segmentation_head.pth").exists()
    result = run("train", reference, tmp_path / "h2", "--epochs", "1", "--val-cache", cache)
    assert_one_line_error(result, "c.zarr/zarr.json", "do not match their stored fingerprint")


# --------------------------------------------------------------------------- 13a: damage


def test_corrupt_class_pixels_chunk_is_one_line_from_train(reference, tmp_path):
    cache = copy_of(reference, tmp_path)
    chunk = cache / "class_pixels" / "c" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    chunk.write_bytes(bytes(raw))
    result = run("train", cache, tmp_path / "h", "--epochs", "1")
    assert_one_line_error(result, "c.zarr", "class_pixels chunk (0,): unreadable", "verify")


@pytest.mark.parametrize("where", ["zarr.json", "features/zarr.json", "hackathon_labels/zarr.json"])
def test_invalid_json_metadata_is_one_line_everywhere(reference, tmp_path, where):
    cache = copy_of(reference, tmp_path)
    (cache / where).write_text('{"zarr_format": 3, "node_type":')
    commands = [["cache", "verify", cache], ["train", cache, tmp_path / "h", "--epochs", "1"]]
    if where != "hackathon_labels/zarr.json":  # info does not read that array
        commands.append(["cache", "info", cache])
    for command in commands:
        result = run(*command)
        assert_one_line_error(result, f"c.zarr/{where}", "re-extract")
        assert "JSON" in result.stderr or "Expecting value" in result.stderr, result.stderr


def test_invalid_root_json_is_recovered_by_overwrite(data, reference, tmp_path):
    cache = copy_of(reference, tmp_path)
    (cache / "zarr.json").write_text("{")
    result = run("extract", data, cache, *ARGS)
    assert_one_line_error(result, "c.zarr/zarr.json: invalid JSON", "--overwrite")
    assert run("extract", data, cache, *ARGS, "--overwrite").exit_code == 0
    assert_byte_identical(cache, reference)


# --------------------------------------------------------------------------- remote caches

from tests.guarantees.test_scale_out import s3  # noqa: E402, F401  (moto's S3 server on loopback)

BUCKET = "fleet-caches"


def assert_same_arrays(url: str, reference: Path) -> None:
    remote, local = zarr.open_group(url, mode="r"), zarr.open_group(str(reference), mode="r")
    for name in ("features", "labels", "done", "names", "class_pixels", "chunk_checksums"):
        np.testing.assert_array_equal(remote[name][:], local[name][:], err_msg=name)
    assert remote.attrs["fingerprint"] == local.attrs["fingerprint"]
    assert remote.attrs["complete"] is True


def test_s3_prefix_holding_other_objects_is_refused_and_overwrite_keeps_them(data, reference, s3):  # noqa: F811
    url = f"s3://{BUCKET}/runs/out.zarr"
    s3.put_object(Bucket=BUCKET, Key="runs/out.zarr/notes.txt", Body=b"mine")
    for extra in ([], ["--overwrite"]):
        result = run("extract", data, url, *ARGS, *extra)
        assert_one_line_error(result, url, "not an offroad-seg feature cache", "notes.txt")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert keys == ["runs/out.zarr/notes.txt"]
    # a cache of ours with a user's object beside it: --overwrite replaces only the cache
    url = f"s3://{BUCKET}/runs/c.zarr"
    assert run("extract", data, url, *ARGS).exit_code == 0
    s3.put_object(Bucket=BUCKET, Key="runs/c.zarr/notes.txt", Body=b"mine")
    result = run("extract", data, url, *ARGS, "--overwrite")
    assert result.exit_code == 0, result.output
    body = s3.get_object(Bucket=BUCKET, Key="runs/c.zarr/notes.txt")["Body"].read()
    assert body == b"mine"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert f"runs/c.zarr/{MARKER}" not in keys
    assert_same_arrays(url, reference)
    assert run("cache", "verify", url).exit_code == 0


def test_remote_creation_interrupted_then_rerun_finishes(data, reference, monkeypatch):
    from zarr.storage import FsspecStore

    url = "memory://guard-creation/c.zarr"
    real_set, calls = FsspecStore.set, {"n": 0}

    async def crash_on_fifth(self, key, value):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Crash
        return await real_set(self, key, value)

    monkeypatch.setattr(FsspecStore, "set", crash_on_fifth)
    with pytest.raises(Crash):
        extract(config(data, url))
    monkeypatch.setattr(FsspecStore, "set", real_set)
    result = run("cache", "info", url)
    assert_one_line_error(result, url, "creation was interrupted", "rerun the same")
    assert run("extract", data, url, *ARGS).exit_code == 0
    assert_same_arrays(url, reference)


# --------------------------------------------------------------------------- 14: storage faults


@pytest.fixture()
def offline_s3(monkeypatch):
    """S3 settings that fail fast without leaving loopback: the discard port, one attempt."""
    from s3fs import S3FileSystem

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask 169.254.169.254
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv(
        "OFFROAD_SEG_STORAGE_OPTIONS",
        json.dumps({"config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}),
    )
    S3FileSystem.clear_instance_cache()  # each test's settings make a new client
    yield monkeypatch
    S3FileSystem.clear_instance_cache()


def storage_commands(data: Path, url: str, tmp_path: Path) -> list[list]:
    return [
        ["extract", data, url, *ARGS],
        ["cache", "verify", url],
        ["cache", "info", url],
        ["train", url, tmp_path / "h", "--epochs", "1"],
    ]


def test_missing_credentials_are_one_line(data, tmp_path, offline_s3):
    offline_s3.delenv("AWS_ACCESS_KEY_ID", raising=False)
    offline_s3.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    offline_s3.delenv("AWS_PROFILE", raising=False)
    url = "s3://fleet-caches/c.zarr"
    for command in storage_commands(data, url, tmp_path):
        result = run(*command)
        assert_one_line_error(result, url, "NoCredentialsError", "AWS_ACCESS_KEY_ID")
    assert not (tmp_path / "h").exists()


def test_unreachable_endpoint_is_one_line(data, tmp_path, offline_s3):
    offline_s3.setenv("AWS_ACCESS_KEY_ID", "testing")
    offline_s3.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    url = "s3://fleet-caches/c.zarr"
    started = time.monotonic()
    result = run("cache", "verify", url)
    assert time.monotonic() - started < 30
    assert_one_line_error(result, url, "Could not connect", "127.0.0.1:9", "AWS_ENDPOINT_URL")
    result = run("extract", data, url, *ARGS)
    assert_one_line_error(result, url, "Could not connect")


def test_unknown_protocol_and_bad_storage_option_are_one_line(data, tmp_path, offline_s3):
    for command in storage_commands(data, "foo://x", tmp_path):
        assert_one_line_error(run(*command), "foo://x", "Protocol not known: foo")
    offline_s3.setenv("AWS_ACCESS_KEY_ID", "testing")
    offline_s3.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    offline_s3.setenv("OFFROAD_SEG_STORAGE_OPTIONS", '{"no_such_option": 1}')
    url = "s3://fleet-caches/c.zarr"
    for command in storage_commands(data, url, tmp_path):
        result = run(*command)
        assert_one_line_error(result, url, "no_such_option", "OFFROAD_SEG_STORAGE_OPTIONS")
