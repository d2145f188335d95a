"""Crash safety, integrity, concurrency and write errors, with real processes and signals."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from offroad_seg.data.synthetic import write_split
from offroad_seg.errors import CacheError
from offroad_seg.features.cache import FeatureCache
from offroad_seg.features.extract import extract
from tests.conftest import extract_config

N = 14
ARGS = [
    "--weights",
    "random",
    "--size",
    "56x98",
    "--workers",
    "0",
    "--batch-size",
    "2",
    "--images-per-chunk",
    "1",
    "--views",
    "flip",
    "--cache-version",
    "1",
]
# format 2 at two chunks per shard: seven shards, each a write unit
ARGS_V2 = [*ARGS[:-1], "2", "--chunks-per-shard", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash")
    write_split(root / "train", N, seed=5, width=196, height=112)
    return root / "train"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The same extraction, never interrupted."""
    cache = tmp_path_factory.mktemp("ref") / "ref.zarr"
    extract(config(data, cache))
    return cache


def config(data: Path, cache: Path):
    """The in-process twin of ARGS."""
    return extract_config(
        data, cache, batch_size=2, images_per_chunk=1, views=("identity", "hflip"), cache_version=1
    )


def start(data: Path, cache: Path, args: list[str] = ARGS) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "offroad_seg", "extract", str(data), str(cache), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # a suite started in the background (`cmd &`) ignores SIGINT, and children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def done_count(cache: Path) -> int:
    try:
        return int(zarr.open_group(str(cache), mode="r")["done"][:].sum())
    except Exception:  # not created yet
        return -1


def wait_for(proc: subprocess.Popen, cache: Path, at_least: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = done_count(cache)
        if n >= at_least or proc.poll() is not None:
            return n
        time.sleep(0.02)
    raise TimeoutError(f"extract did not reach {at_least} images")


def assert_identical(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name in ("features", "labels", "done", "names", "class_pixels"):
        np.testing.assert_array_equal(ga[name][:], gb[name][:], err_msg=name)
    assert ga.attrs["fingerprint"] == gb.attrs["fingerprint"]
    assert ga.attrs["complete"] is True


def test_sigkill_at_random_moments_then_resume(data, reference, tmp_path):
    """Format 2 (the default; shards of two one-image chunks) resumes to the arrays of the
    uninterrupted format-1 cache (the batches are the same). Format 1's writes are the same
    steps without the shard; Ctrl-C and a dead owner are tested on it below."""
    args = ARGS_V2
    cache = tmp_path / "c.zarr"
    rng = random.Random(1234)
    kills = 0
    for target in sorted(rng.sample(range(1, N - 1), 3)):
        proc = start(data, cache, args)
        reached = wait_for(proc, cache, target)
        time.sleep(rng.uniform(0, 0.3))  # land anywhere: mid-batch, mid-write, between chunks
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        assert reached >= target or proc.returncode == 0
        info = FeatureCache.open(cache)
        assert not info.complete or info.done().all()
    assert kills >= 2
    final = start(data, cache, args)
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    # the rerun resumes, or (every chunk was written before the last kill) says so once, in
    # its summary, after finishing a cache whose last step was cut off
    resumed, done = "resuming" in err, "were already extracted" in out
    assert resumed != done, (out, err)
    assert not (resumed and "finishing the cache" in err), err
    assert_identical(cache, reference)
    assert FeatureCache.open(cache).verify(progress=False).ok
    assert not list(cache.rglob("*.partial"))
    assert FeatureCache.open(cache).spec.version == int(args[args.index("--cache-version") + 1])


def paused_mid_extraction(data: Path, cache: Path) -> subprocess.Popen:
    """An extract process frozen (SIGSTOP) with some but not all chunks written: tiny images
    extract in well under a second, so without the freeze a signal could arrive after the end."""
    for _ in range(5):
        proc = start(data, cache)
        wait_for(proc, cache, 1)
        proc.send_signal(signal.SIGSTOP)
        if proc.poll() is None and 0 < done_count(cache) < N:
            return proc
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        shutil.rmtree(cache, ignore_errors=True)
    raise AssertionError("could not catch extract mid-way in 5 tries")


def test_ctrl_c_leaves_a_resumable_cache(data, reference, tmp_path):
    cache = tmp_path / "c.zarr"
    proc = paused_mid_extraction(data, cache)
    proc.send_signal(signal.SIGINT)  # delivered when it resumes
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: interrupted:") and "rerun the same command to resume" in last
    assert "Traceback" not in err
    assert not FeatureCache.open(cache).complete
    again = start(data, cache)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert_identical(cache, reference)


def test_second_writer_refused_and_dead_owner_recovered(data, reference, tmp_path):
    cache = tmp_path / "c.zarr"
    proc = paused_mid_extraction(data, cache)
    try:
        with pytest.raises(
            CacheError, match=rf"another `offroad-seg extract` is writing.*pid {proc.pid}"
        ):
            extract(config(data, cache))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the owner died holding the lock: the kernel released it, so a new run proceeds
    extract(config(data, cache))
    assert_identical(cache, reference)


def test_disk_full_stops_cleanly_and_resumes(data, reference, tmp_path, monkeypatch):
    import zarr.storage._local as local

    real_put = local._put
    calls = {"n": 0}

    def put_until_full(path, value, exclusive=False):
        if "/features/c/" in str(path):
            calls["n"] += 1
            if calls["n"] > 9:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", put_until_full)
    cache = tmp_path / "c.zarr"
    cfg = config(data, cache)
    with pytest.raises(
        CacheError,
        match=r"cannot write \(No space left on device\); \d+ of 14 images are safely stored",
    ):
        extract(cfg)
    partial = FeatureCache.open(cache)
    assert not partial.complete and 0 < partial.done().sum() < N
    monkeypatch.setattr(local, "_put", real_put)
    extract(cfg)
    assert_identical(cache, reference)


def corrupt_copy(reference: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(reference, copy)
    return copy


def test_verify_names_truncated_and_missing_chunks(reference, tmp_path):
    cache = corrupt_copy(reference, tmp_path)
    truncated = cache / "features" / "c" / "3" / "1" / "0" / "0" / "0"
    truncated.write_bytes(truncated.read_bytes()[:100])
    missing = cache / "labels" / "c" / "5" / "0" / "0" / "0"
    missing.unlink()
    flipped = cache / "features" / "c" / "7" / "0" / "0" / "0" / "0"
    data = bytearray(flipped.read_bytes())
    data[-10] ^= 1
    flipped.write_bytes(bytes(data))
    report = FeatureCache.open(cache).verify(progress=False)
    problems = "\n".join(report.problems)
    assert len(report.problems) == 3, problems
    assert "features chunk (3, 1, 0, 0, 0): unreadable (features/c/3/1/0/0/0)" in problems
    assert "labels chunk (5, 0, 0, 0): missing (labels/c/5/0/0/0)" in problems
    assert "features chunk (7, 0, 0, 0, 0): unreadable" in problems


def test_verify_cli_exit_status(reference, tmp_path):
    from click.testing import CliRunner

    from offroad_seg.cli import cli

    cache = corrupt_copy(reference, tmp_path)
    assert CliRunner().invoke(cli, ["cache", "verify", str(cache)]).exit_code == 0
    (cache / "done" / "c" / "2").unlink()
    r = CliRunner().invoke(cli, ["cache", "verify", str(cache)])
    assert r.exit_code == 1
    assert "done chunk (2,): missing (done/c/2)" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:")


def test_sigkill_during_training_then_resume(reference, tmp_path):
    import json

    import torch

    from offroad_seg.models.checkpoint import load_checkpoint
    from offroad_seg.training.loop import TrainConfig, train

    epochs = 40
    # a light head: this tests kill and resume, not a head (the default pyramid takes ~10x
    # longer per epoch on two cores)
    args = [
        "train",
        str(reference),
        "--head",
        "convnext",
        "--epochs",
        str(epochs),
        "--batch-size",
        "4",
        "--device",
        "cpu",
    ]
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "offroad_seg", *args[:2], str(run), *args[2:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    history = run / "train_stats" / "history.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if history.exists() and len(json.loads(history.read_text())["history"]) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = load_checkpoint(run / "last.pth").payload["epoch"]
    assert 3 <= stopped_at < epochs
    resumed = subprocess.run(
        [sys.executable, "-m", "offroad_seg", *args[:2], str(run), *args[2:], "--resume"],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} at epoch {stopped_at + 1}" in resumed.stderr
    full = train(
        TrainConfig(
            caches=(reference,),
            out=tmp_path / "full",
            head="convnext",
            epochs=epochs,
            batch_size=4,
            device="cpu",
            progress=False,
        )
    )
    a = load_checkpoint(run / "segmentation_head.pth").payload
    b = load_checkpoint(tmp_path / "full" / "segmentation_head.pth").payload
    assert a["epoch"] == b["epoch"] == epochs
    for k in b["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0)
    assert (
        json.loads((run / "train_stats" / "history.json").read_text())["history"][-1]["train_loss"]
        == full.history[-1]["train_loss"]
    )
