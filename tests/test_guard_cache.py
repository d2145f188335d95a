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
from pathlib import Path

import pytest
import zarr

from offroad_seg.cache import MARKER, FeatureCache
from offroad_seg.errors import CacheError
from offroad_seg.extract import extract

from .conftest import extract_config
from .test_bad_input import assert_one_line_error, make_dataset, run

H, W = 28, 42
ARGS = ["--weights", "random", "--size", f"{H}x{W}", "--workers", "0", "--images-per-chunk", "2"]


@pytest.fixture(scope="module", autouse=True)
def backbone_built_once():
    """Every in-process extract here reuses one random backbone (building it costs seconds)."""
    import offroad_seg.extract as module

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
        if "/features/c/" in str(path):
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

    from offroad_seg import storage

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
        if "/names/c/" in str(path):
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

    from offroad_seg.atomic import _TEMP

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
