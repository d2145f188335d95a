"""torchrun (2 CPU processes, gloo) and caches on an S3 API (moto's server on loopback)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from offroad_seg.cli import cli
from offroad_seg.data.synthetic import write_split
from offroad_seg.features.extract import extract
from offroad_seg.training.loop import TrainConfig, train
from tests.conftest import extract_config

N = 20
SIZE = "112x196"  # slow enough on CPU that a run can be stopped half way
EXTRACT = [
    "--weights",
    "random",
    "--size",
    SIZE,
    "--images-per-chunk",
    "1",
    "--batch-size",
    "2",
    "--workers",
    "0",
    # cache format 2 (the default), two one-image chunks per shard: ten shards, dealt out to
    # the ranks whole (no shard has two writers)
    "--chunks-per-shard",
    "2",
]


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
        "-m",
        "offroad_seg",
        *map(str, args),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (torchrun starts its workers in sessions of their own, so
    killing the launcher's process group would leave them running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scale")
    write_split(root / "train", N, seed=11, width=196, height=112)
    write_split(root / "val", 4, seed=12, width=196, height=112)
    return root


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> Path:
    """The single-process cache everything is compared with."""
    cache = tmp_path_factory.mktemp("single") / "train.zarr"
    extract(
        extract_config(data / "train", cache, size=(112, 196), batch_size=2, images_per_chunk=1)
    )
    return cache


def assert_same_cache(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name in ("features", "labels", "done", "names", "class_pixels"):
        np.testing.assert_array_equal(ga[name][:], gb[name][:], err_msg=name)
    assert ga.attrs["fingerprint"] == gb.attrs["fingerprint"]
    assert ga.attrs["complete"] is gb.attrs["complete"] is True


def test_two_process_extract_equals_single_process(data, single, tmp_path):
    cache = tmp_path / "two.zarr"
    run = subprocess.run(
        torchrun("extract", data / "train", cache, *EXTRACT),
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("extracted 20 of 20 images") == 1  # rank 0 reports, once
    assert_same_cache(cache, single)


def test_two_process_half_done_then_one_process_resumes(data, single, tmp_path):
    cache = tmp_path / "half.zarr"
    proc = subprocess.Popen(
        torchrun("extract", data / "train", cache, *EXTRACT),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    done = 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = int(zarr.open_group(str(cache), mode="r")["done"][:].sum())
        except Exception:
            done = 0
        if done >= N // 3:
            break
        time.sleep(0.01)
    for pid in [proc.pid, *descendants(proc.pid)]:  # the launcher and both ranks, mid-run
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.2)
    stopped = int(zarr.open_group(str(cache), mode="r")["done"][:].sum())
    assert 0 < stopped < N, f"the 2-process run was not stopped half way ({stopped}/{N})"
    assert zarr.open_group(str(cache), mode="r").attrs["complete"] is False
    resumed = CliRunner().invoke(cli, ["extract", str(data / "train"), str(cache), *EXTRACT])
    assert resumed.exit_code == 0, resumed.output
    assert f"extracted {N - stopped} of {N} images" in resumed.stdout
    assert_same_cache(cache, single)


def test_ddp_training_matches_single_process(data, single, tmp_path):
    """Same global batch, dropout off: 2 ranks must reproduce 1 process (stated tolerance:
    relative 1e-5 on every step's loss and on the validation metrics)."""
    val = tmp_path / "val.zarr"
    extract(extract_config(data / "val", val, size=(112, 196)))
    # the convnext head: AdamW amplifies the float rounding of other reduction orders in
    # parameters whose gradients are near zero, and the pyramid head has more of them; this
    # test is about DDP taking one process's steps, not about a head
    common = [
        "--val-cache",
        val,
        "--head",
        "convnext",
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--dropout",
        "0",
        "--device",
        "cpu",
    ]
    one = train(
        TrainConfig(
            caches=(single,),
            out=tmp_path / "one",
            val_cache=val,
            head="convnext",
            epochs=3,
            batch_size=4,
            dropout=0.0,
            device="cpu",
            progress=False,
        )
    )
    run = subprocess.run(
        torchrun("train", single, tmp_path / "two", *common),
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("trained 3 epochs") == 1 and run.stderr.count("epoch   3/3") == 1
    two = json.loads((tmp_path / "two" / "train_stats" / "history.json").read_text())
    for a, b in zip(one.history, two["history"], strict=True):
        for key in ("train_loss", "val_loss", "val_miou", "val_dice", "val_pixel_acc"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    sa = torch.load(tmp_path / "one" / "last.pth", weights_only=True)["state_dict"]
    sb = torch.load(tmp_path / "two" / "last.pth", weights_only=True)
    assert sb["world_size"] == 2 and len(sb["rng"]) == 2
    # each rank its own RNG stream (dropout masks differ), rank 0 the one-process stream
    sa_rng = torch.load(tmp_path / "one" / "last.pth", weights_only=True)["rng"]
    assert torch.equal(sb["rng"][0]["cpu"], sa_rng[0]["cpu"])
    assert not torch.equal(sb["rng"][1]["cpu"], sb["rng"][0]["cpu"])
    for k in sa:
        torch.testing.assert_close(sb["state_dict"][k], sa[k], rtol=1e-4, atol=1e-6)
    # one set of outputs: rank 0 writes, nobody else
    written = sorted(p.name for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert written == sorted(p.name for p in (tmp_path / "one").rglob("*") if p.is_file())


@pytest.fixture()
def s3(monkeypatch):
    """A real S3 API on loopback: moto's server, started here and stopped after."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    import boto3
    import fsspec

    fsspec.AbstractFileSystem.clear_instance_cache()  # no client bound to another endpoint
    boto3.client("s3").create_bucket(Bucket="fleet-caches")
    yield boto3.client("s3")
    server.stop()


def test_extract_train_verify_on_s3(data, single, s3, tmp_path):
    url = "s3://fleet-caches/runs/train.zarr"
    runner = CliRunner()
    r = runner.invoke(cli, ["extract", str(data / "train"), url, *EXTRACT])
    assert r.exit_code == 0, r.output
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="fleet-caches")["Contents"]]
    assert "runs/train.zarr/zarr.json" in keys and "runs/train.zarr/features/c.0.0.0.0.0" in keys
    # (other tests' caches share the session's bucket)
    features = [k for k in keys if k.startswith("runs/train.zarr/features/")]
    assert len(features) == 1 + 10  # metadata, 10 shards of 2
    g = zarr.open_group(str(single), mode="r")
    remote = zarr.open_group(url, mode="r")
    np.testing.assert_array_equal(remote["features"][:], g["features"][:])
    r = runner.invoke(cli, ["cache", "verify", url])
    assert r.exit_code == 0 and r.stdout.startswith("ok:"), r.output
    r = runner.invoke(cli, ["train", url, str(tmp_path / "h"), "--epochs", "2"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "h" / "segmentation_head.pth").exists()
    # damage one object: verify names it
    s3.put_object(Bucket="fleet-caches", Key="runs/train.zarr/labels/c.1.0.0.0", Body=b"junk")
    r = runner.invoke(cli, ["cache", "verify", url])  # shard 1 held chunks 2 and 3
    assert r.exit_code == 1 and "labels chunk (3, 0, 0, 0): unreadable" in r.stderr


def test_memory_url_round_trip(data, tmp_path):
    url = "memory://offroad-test/val.zarr"
    extract(extract_config(data / "val", url, size=(112, 196)))
    r = CliRunner().invoke(cli, ["cache", "info", url])
    assert r.exit_code == 0 and "complete (4/4 images)" in r.stdout
    shutil.rmtree(tmp_path, ignore_errors=True)
