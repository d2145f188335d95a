"""Guards of issue #21 for inference (evaluate, predict, export, the engines, image input): a
user's files survive --overwrite, tampered models and oversized images are refused in one line
before any output exists, a full disk is named, leftovers of killed runs go on the next run,
FIFOs in input folders are skipped, and decoding workers die with their parent."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import offroad_seg.inference.image_outputs as image_outputs
from offroad_seg.cli import cli
from offroad_seg.core.atomic import atomic_write, temp_path
from offroad_seg.data.classes import ClassMap
from offroad_seg.data.synthetic import write_split
from offroad_seg.errors import OffroadSegError
from offroad_seg.inference.engines import OnnxEngine
from offroad_seg.inference.runfolder import RUN_FILE, RecordLog
from offroad_seg.models.checkpoint import head_payload, save_checkpoint
from offroad_seg.models.heads import HeadConfig, build_head
from offroad_seg.models.preprocess import Preprocessing
from tests.conftest import SIZE
from tests.guarantees.test_scale_out import descendants

from .test_bad_input import assert_one_line_error

N = 4
PREDICT = ["--workers", "0", "--device", "cpu", "--batch-size", "2"]
EVAL = [*PREDICT, "--comparisons", "1"]
EXTRACT = ["--weights", "random", "--size", "56x98", "--workers", "0", "--batch-size", "2"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def tool(*args) -> list[str]:
    """The command line of the tool in a process of its own."""
    return [sys.executable, "-m", "offroad_seg", *[str(a) for a in args]]


def dead_pid() -> int:
    """The pid of a process that has ended (a killed writer, as far as leftovers go)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def contents(folder: Path, *subfolders: str) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for sub in subfolders
        for p in sorted((folder / sub).iterdir())
    }


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("guard-infer") / "val"
    write_split(root, N, seed=3, width=196, height=112)
    return root


@pytest.fixture(scope="module")
def head(backbone, tmp_path_factory) -> Path:
    """A random linear head on the random backbone, at the test working size."""
    cfg = HeadConfig(name="linear", in_channels=backbone.spec.channels)
    torch.manual_seed(0)
    payload = head_payload(
        cfg, ClassMap.default(), backbone.spec, Preprocessing(size=SIZE),
        state_dict=build_head(cfg).state_dict(),
    )  # fmt: skip
    path = tmp_path_factory.mktemp("guard-head") / "head.pth"
    save_checkpoint(path, payload)
    return path


@pytest.fixture(scope="module")
def predicted(head, split, tmp_path_factory) -> Path:
    """An uninterrupted predict: what a rerun after any failure must equal."""
    out = tmp_path_factory.mktemp("guard-ref") / "pred"
    r = run("predict", head, split / "Color_Images", out, *PREDICT)
    assert r.exit_code == 0, r.output
    return out


# ----------------------------------------------------------------------------- item 2


def test_overwrite_removes_only_what_runs_recorded_writing(head, split, predicted, tmp_path):
    out = tmp_path / "out"
    assert run("evaluate", head, split, out, *EVAL).exit_code == 0
    mine = {
        "notes.txt": b"mine",
        "masks/a_gt.txt": b"ground truth",
        "thumbnails/keep.jpg": b"a picture",
        "records/readme.md": b"about",
        "sub/x.bin": b"x",
    }
    for relative, data in mine.items():
        (out / relative).parent.mkdir(exist_ok=True)
        (out / relative).write_bytes(data)
    # a run killed after writing an image's file but before its record: announced, so removed
    records = RecordLog(out, rank=0)
    records.intend("ghost.png", ["masks/ghost.png"])
    records.close()
    (out / "masks" / "ghost.png").write_bytes(b"half a run")

    r = run("predict", head, split / "Color_Images", out, *PREDICT, "--overwrite")
    assert r.exit_code == 0, r.output
    for relative, data in mine.items():
        assert (out / relative).read_bytes() == data, relative
    for gone in ("report.html", "metrics.json", "evaluation_metrics.txt", "comparisons",
                 "per_class_metrics.png", "confusion_matrix.png", "masks/ghost.png"):  # fmt: skip
        assert not (out / gone).exists(), gone
    assert sorted(os.listdir(out / "thumbnails")) == ["keep.jpg"]  # the tool's thumbnails went
    new = contents(out, "masks", "masks_color", "overlays")
    assert new.pop("masks/a_gt.txt") == b"ground truth"
    assert new == contents(predicted, "masks", "masks_color", "overlays")

    # a hand-written report.html: evaluate would replace it, so it is refused, untouched
    (out / "report.html").write_text("my report")
    r = run("evaluate", head, split, out, *EVAL, "--overwrite")
    assert_one_line_error(r, str(out / "report.html"), "not written by offroad-seg")
    assert (out / "report.html").read_text() == "my report"
    assert contents(out, "overlays") == contents(predicted, "overlays")  # nothing was touched
    # predict does not write it: it stays; the overlays folder the tool made goes with its files
    r = run("predict", head, split / "Color_Images", out, *PREDICT, "--overwrite", "--no-overlays")
    assert r.exit_code == 0, r.output
    assert (out / "report.html").read_text() == "my report"
    assert not (out / "overlays").exists()
    for relative, data in mine.items():
        assert (out / relative).read_bytes() == data, relative


def test_fresh_run_refuses_to_replace_a_users_file(head, split, tmp_path):
    out = tmp_path / "out"
    (out / "masks").mkdir(parents=True)
    name = sorted((split / "Color_Images").iterdir())[1].name
    (out / "masks" / name).write_bytes(b"my own mask")
    for extra in ([], ["--overwrite"]):
        r = run("predict", head, split / "Color_Images", out, *PREDICT, *extra)
        assert_one_line_error(r, f"masks/{name}", "not written by offroad-seg")
    assert (out / "masks" / name).read_bytes() == b"my own mask"
    assert sorted(os.listdir(out)) == ["masks"]


# ----------------------------------------------------------------------------- item 11


def stale_temp(path: Path, pid: int) -> Path:
    """The temporary file `atomic_write` would leave for `path` if process `pid` was killed."""
    name = temp_path(path).name.replace(f"-{os.getpid()}.", f"-{pid}.")
    temp = path.with_name(name)
    temp.parent.mkdir(parents=True, exist_ok=True)
    temp.write_bytes(b"torn")
    return temp


def test_rerun_removes_killed_writers_temporary_files(head, split, predicted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(predicted, out)
    dead = dead_pid()
    names = ("predictions.json", "masks/x.png", "overlays/x.png", "records/rank-0.jsonl")
    stale = [stale_temp(out / name, dead) for name in names]
    live = stale_temp(out / "report.html", os.getpid())  # a running writer's: not touched
    r = run("predict", head, split / "Color_Images", out, *PREDICT)
    assert r.exit_code == 0, r.output
    assert [p for p in stale if p.exists()] == []
    assert live.read_bytes() == b"torn"
    assert contents(out, "masks", "masks_color", "overlays") == contents(
        predicted, "masks", "masks_color", "overlays"
    )


# A `predict --engine onnxruntime` of a .pth head leaves no export folder, and removes a killed
# run's: tests/inference/test_export.py::test_cli_predict_engine_onnxruntime_exports_a_pth_head
# (it exports a full ViT-S once for both checks).


# ----------------------------------------------------------------------------- items 7d, 16


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A small exported model (a 1-block backbone), sealed with its weights digest."""
    from offroad_seg.inference.export import export_model
    from tests.inference.test_export import truncated_model

    folder = tmp_path_factory.mktemp("guard-onnx")
    model = truncated_model(folder, "dinov2_vits14", depth=1, head="linear")
    killed = stale_temp(folder / "model.onnx", dead_pid())  # a killed export's scratch file
    export_model(model, folder / "model.onnx", batch=None)
    assert not killed.exists()
    assert sorted(p.name for p in folder.iterdir()) == ["head.pth", "model.onnx"]
    return folder / "model.onnx"


def _edit_size(model) -> None:
    import onnx  # noqa: F401 (the proto's package)

    for prop in model.metadata_props:
        if prop.key == "preprocessing":
            prep = json.loads(prop.value)
            prep["size"] = [2 * v for v in prep["size"]]
            prop.value = json.dumps(prep)


def _without_digest(model) -> None:
    kept = [p for p in model.metadata_props if p.key != "weights_sha256"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)


def tampered(src: Path, dst: Path, how: str) -> Path:
    import onnx

    data = bytearray(src.read_bytes())
    if how == "weight byte":
        data[len(data) // 2] ^= 0x10
        dst.write_bytes(bytes(data))
    elif how == "truncated":
        dst.write_bytes(bytes(data[: len(data) // 2]))
    else:
        model = onnx.load(str(src))
        for edit in {"size": [_edit_size], "size, no digest": [_edit_size, _without_digest],
                     "no digest": [_without_digest]}[how]:  # fmt: skip
            edit(model)
        onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize(
    "how, needles",
    [
        ("weight byte", ["do not match the digest stored at export"]),
        ("size", ["do not match the digest stored at export"]),
        ("size, no digest", ["metadata says 112x196 images but its graph takes 56x98"]),
        ("truncated", ["cannot read ONNX model"]),
    ],
)
def test_tampered_export_refused_before_any_output(exported, split, tmp_path, how, needles):
    bad = tampered(exported, tmp_path / "bad.onnx", how)
    out = tmp_path / "out"
    r = run("predict", bad, split / "Color_Images", out, *PREDICT)
    assert_one_line_error(r, str(bad), *needles)
    assert not out.exists()


def test_intact_export_loads_and_one_without_digest_warns(exported, split, tmp_path):
    import onnx

    props = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    assert len(props["weights_sha256"]) == 64
    OnnxEngine(exported)  # verified, loads
    old = tampered(exported, tmp_path / "old.onnx", "no digest")
    r = run("predict", old, split / "Color_Images", tmp_path / "out", *PREDICT)
    assert r.exit_code == 0, r.output
    assert "holds no weights digest" in r.stderr


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_head_whose_config_does_not_fit_its_tensors(head, split, tmp_path, command):
    payload = torch.load(head, weights_only=True)
    payload["state_dict"]["classifier.weight"] = payload["state_dict"]["classifier.weight"][:5]
    bad = tmp_path / "bad.pth"
    save_checkpoint(bad, payload)
    inputs = split if command == "evaluate" else split / "Color_Images"
    out = tmp_path / "out"
    r = run(command, bad, inputs, out, *PREDICT)
    assert_one_line_error(r, str(bad), "do not fit its head config", "classifier.weight")
    assert not out.exists()


# ----------------------------------------------------------------------------- item 15


def write_png_bomb(path: Path, width: int, height: int) -> None:
    """A 1-bit PNG of zeros: ~24 KB on disk for 20000x10000 pixels (600 MB as RGB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data).to_bytes(4, "big")
        return len(data).to_bytes(4, "big") + kind + data + crc

    packer = zlib.compressobj(9)
    row = bytes(1 + -(-width // 8))
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
                     + chunk(b"IEND", b""))  # fmt: skip


def test_decompression_bomb_refused_in_extract_and_predict(head, split, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(split, data)
    bomb = data / "Color_Images" / "zz_bomb.png"
    write_png_bomb(bomb, 20000, 10000)
    assert bomb.stat().st_size < 30_000
    shutil.copy(next((data / "Segmentation").iterdir()), data / "Segmentation" / "zz_bomb.png")
    r = run("extract", data, tmp_path / "c.zarr", *EXTRACT)
    assert_one_line_error(r, str(bomb), "image too large (200000000 pixels")
    assert not (tmp_path / "c.zarr").exists()
    r = run("predict", head, data / "Color_Images", tmp_path / "out", *PREDICT)
    assert_one_line_error(r, str(bomb), "image too large (200000000 pixels")
    # below Pillow's own error and above the limit: the same refusal, from the header
    big = tmp_path / "big.png"
    write_png_bomb(big, 15000, 10000)
    r = run("predict", head, big, tmp_path / "out", *PREDICT)
    assert_one_line_error(r, str(big), "image too large (15000x10000 = 150000000 pixels")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- item 17


def test_disk_full_names_the_file_and_the_rerun_recovers(
    head, split, predicted, tmp_path, monkeypatch
):
    real = image_outputs.save_color_mask
    calls = []

    def disk_full_at_the_third(path, ids, class_map):
        calls.append(path)
        if len(calls) >= 3:  # a write through a file object: its OSError names no file

            def fill(f):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            atomic_write(path, fill)
        real(path, ids, class_map)

    monkeypatch.setattr(image_outputs, "save_color_mask", disk_full_at_the_third)
    out = tmp_path / "out"
    r = run("predict", head, split / "Color_Images", out, *PREDICT[:-1], "1")
    assert_one_line_error(
        r, str(out / "masks_color" / calls[2].name), "No space left on device",
        "rerun the same command",
    )  # fmt: skip
    monkeypatch.setattr(image_outputs, "save_color_mask", real)
    r = run("predict", head, split / "Color_Images", out, *PREDICT[:-1], "1")
    assert r.exit_code == 0, r.output
    assert contents(out, "masks", "masks_color", "overlays") == contents(
        predicted, "masks", "masks_color", "overlays"
    )


def test_fifo_in_an_input_folder_is_skipped_not_waited_on(head, split, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(split, data)
    fifo = data / "Color_Images" / "zz_pipe.png"
    os.mkfifo(fifo)
    runs = {
        "extract": tool("extract", data, tmp_path / "c.zarr", *EXTRACT),
        "predict": tool("predict", head, data / "Color_Images", tmp_path / "out", *PREDICT),
    }
    for name, cmd in runs.items():
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, (name, done.stderr)
        assert "skipped 1 entry that is not a regular file" in done.stderr, done.stderr
        assert "zz_pipe.png" in done.stderr
    assert len(os.listdir(tmp_path / "out" / "masks")) == N
    r = run("predict", head, fifo, tmp_path / "out2", *PREDICT)
    assert_one_line_error(r, str(fifo), "not a regular file")


# ----------------------------------------------------------------------------- item 18


def alive(pid: int) -> bool:
    """Running (a zombie has died: only its parent's wait is missing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """Enough labelled scenes that workers are still decoding when the parent is killed."""
    root = tmp_path_factory.mktemp("guard-many") / "val"
    write_split(root, 16, seed=4, width=392, height=224)
    return root


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("command", ["extract", "predict"])
def test_workers_die_with_a_killed_parent(command, head, many, tmp_path):
    """Extract's loader, and predict's (evaluate decodes through the same `inference.batches`
    loader as predict)."""
    workers = ["--workers", "1", "--batch-size", "1"]
    cmd = {
        "extract": tool("extract", many, tmp_path / "c.zarr", *EXTRACT[:4], *workers),
        "predict": tool("predict", head, many, tmp_path / "p", "--device", "cpu", *workers),
    }[command]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not descendants(proc.pid):
            assert proc.poll() is None, f"{command} ended before its workers started"
            assert time.monotonic() < deadline, f"{command} started no worker"
            time.sleep(0.02)
        proc.send_signal(signal.SIGSTOP)  # frozen mid-run: its workers keep their queues full
        time.sleep(0.5)
        children = descendants(proc.pid)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 3  # torch's own watchdog takes 5 s, or forever
        while any(map(alive, children)) and time.monotonic() < deadline:
            time.sleep(0.02)
        survivors = [pid for pid in children if alive(pid)]
        assert children and not survivors, f"{command}: {survivors} outlived their parent"
    finally:
        proc.kill()
        for pid in children:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_ledger_of_a_run_is_written_before_its_outputs(head, split, tmp_path):
    """The run file lists the run-level files and created folders: a run killed before them
    still has them removed by --overwrite."""
    out = tmp_path / "out"
    r = run("predict", head, split / "Color_Images", out, *PREDICT)
    assert r.exit_code == 0, r.output
    ledger = json.loads((out / RUN_FILE).read_text())["ledger"]
    assert ledger == {
        "folders": ["masks", "masks_color", "overlays", "records"],
        "files": ["predictions.json"],
    }
    assert np.all([(out / f).is_dir() for f in ledger["folders"]])


def test_tampered_export_in_the_engine_api_is_one_error(exported, tmp_path):
    bad = tampered(exported, tmp_path / "bad.onnx", "weight byte")
    with pytest.raises(OffroadSegError, match="do not match the digest"):
        OnnxEngine(bad)
