"""Evaluation and prediction at scale: torchrun sharding, resuming after kill -9, JPEG folders,
globs and videos, --overwrite, the report, and the messages a new user reads."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from offroad_seg.cli import cli
from offroad_seg.data.images import read_mask
from offroad_seg.data.synthetic import write_split
from offroad_seg.inference.runfolder import RECORDS_DIR, read_records
from offroad_seg.training.loop import TrainConfig, train
from tests.guarantees.test_scale_out import descendants, env, torchrun

N = 12


def run(*args) -> CliRunner:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def head(caches, tmp_path_factory):
    out = tmp_path_factory.mktemp("bi-head")
    cfg = TrainConfig(
        caches=(caches["train"],), out=out, epochs=2, lr=2e-3, progress=False, device="cpu"
    )
    train(cfg)
    return out / "segmentation_head.pth"


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    """N labelled scenes, bigger than the head's working size (so each takes a while)."""
    root = tmp_path_factory.mktemp("bi-data") / "val"
    write_split(root, N, seed=21, width=392, height=224)
    return root


@pytest.fixture(scope="module")
def evaluated(head, split, tmp_path_factory) -> Path:
    """One uninterrupted single-process evaluation: what everything else must equal."""
    out = tmp_path_factory.mktemp("bi-eval") / "out"
    r = run("evaluate", head, split, out, *EVAL)
    assert r.exit_code == 0, r.output
    return out


EVAL = ["--batch-size", "2", "--workers", "0", "--device", "cpu", "--comparisons", "2"]


def metrics_of(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("seconds")
    return metrics


def same_files(a: Path, b: Path, folder: str) -> None:
    names = sorted(p.name for p in (a / folder).iterdir())
    assert names == sorted(p.name for p in (b / folder).iterdir()), folder
    for name in names:
        assert (a / folder / name).read_bytes() == (b / folder / name).read_bytes(), name


def test_evaluate_writes_a_report_and_both_protocols(evaluated, split):
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["images"] == N
    hack = metrics["hackathon_protocol"]
    assert hack["num_batches"] == N // 2 and 0 <= hack["miou"] <= 1
    text = (evaluated / "evaluation_metrics.txt").read_text()
    assert "hackathon protocol (for comparison only)" in text and "backbone: dinov2_vits14" in text
    assert len(list((evaluated / "thumbnails").iterdir())) == N
    assert len(list((evaluated / "comparisons").iterdir())) == 2
    html = (evaluated / "report.html").read_text()
    rows = re.findall(r'<tr class="image-row', html) or re.findall(r"<tr[^>]*data-name=", html)
    assert len(rows) == N
    assert "comparisons/" in html  # the first two rows link to their panels


@pytest.mark.skipif(shutil.which("chromium") is None and not os.environ.get("CI"),
                    reason="chromium is not installed; CI runs this test")  # fmt: skip
def test_evaluate_report_renders_in_chromium(evaluated, tmp_path):
    from tests.reporting.test_report import _chromium

    shot = tmp_path / "report.png"
    dom = _chromium(
        tmp_path / "profile", "--dump-dom", f"--screenshot={shot}", "--window-size=1400,2400",
        (evaluated / "report.html").as_uri(),
    )  # fmt: skip
    marker = re.search(r'data-images-ok="(\d+)"[^>]*data-images-total="(\d+)"', dom)
    assert marker and marker.group(1) == marker.group(2) and int(marker.group(1)) >= N
    with Image.open(shot) as img:
        assert np.asarray(img.convert("RGB")).std() > 20


def test_rerun_of_a_finished_evaluation_has_nothing_to_do(head, split, evaluated, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(evaluated, out)
    r = run("evaluate", head, split, out, *EVAL, "-q")  # global options after the command too
    assert r.exit_code == 0, r.output
    assert f"all {N} images were already evaluated" in r.stdout
    assert metrics_of(out) == metrics_of(evaluated)


def test_two_process_evaluate_equals_one_process(head, split, evaluated, tmp_path):
    out = tmp_path / "two"
    done = subprocess.run(
        torchrun("evaluate", head, split, out, *EVAL),
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("Evaluation of") == 1  # rank 0 reports, once
    # the confusion matrix, and all it gives, is exact; the loss is a float sum of logits that
    # the ranks compute with one thread each (the single process with two): equal to rounding
    two, one = metrics_of(out), metrics_of(evaluated)
    assert two.pop("loss") == pytest.approx(one.pop("loss"), rel=1e-6)
    assert two == one
    for folder in ("masks", "masks_color", "comparisons", "thumbnails"):
        same_files(out, evaluated, folder)
    ranks = sorted(p.name for p in (out / RECORDS_DIR).iterdir())
    assert ranks == ["rank-0.jsonl", "rank-1.jsonl"]


def kill_when(proc: subprocess.Popen, out: Path, at_least: int, timeout: float = 300) -> int:
    """Freeze the run (and its children) once `at_least` images have records, then SIGKILL it:
    a run that is fast on this machine cannot finish first."""
    deadline = time.monotonic() + timeout
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        done = len(read_records(out)) if (out / RECORDS_DIR).exists() else 0
        if done >= at_least:
            break
        time.sleep(0.005)
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        with_suppressed(os.kill, pid, signal.SIGSTOP)
    for pid in pids:
        with_suppressed(os.kill, pid, signal.SIGKILL)
    proc.wait()
    return len(read_records(out))


def with_suppressed(fn, *args) -> None:
    with contextlib.suppress(ProcessLookupError):  # a child that already ended
        fn(*args)


def test_killed_evaluate_resumes_to_identical_metrics(head, split, tmp_path):
    opts = [*EVAL[2:], "--batch-size", "1"]  # many batches, so the kill lands half way
    reference = tmp_path / "reference"
    assert run("evaluate", head, split, reference, *opts).exit_code == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "offroad_seg", "evaluate", head, split, out, *opts]
    # as many threads as this process (conftest: 2), so both compute the same float sums
    threads = {**env(), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([str(c) for c in cmd], env=threads, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    stopped = kill_when(proc, out, at_least=3)
    assert 0 < stopped < N, f"not stopped half way ({stopped} of {N})"
    assert not (out / "metrics.json").exists()
    r = run("evaluate", head, split, out, *opts)
    assert r.exit_code == 0, r.output
    assert f"evaluated {N} images" in r.stdout
    assert metrics_of(out) == metrics_of(reference)
    for folder in ("masks", "masks_color", "comparisons", "thumbnails"):
        same_files(out, reference, folder)


@pytest.fixture(scope="module")
def inputs(split, tmp_path_factory) -> Path:
    """A predict folder of JPEGs (with a stray text file), and a short video."""
    from offroad_seg.data.video import VideoWriter

    root = tmp_path_factory.mktemp("bi-inputs")
    jpgs = root / "jpg"
    jpgs.mkdir()
    for png in sorted((split / "Color_Images").iterdir())[:4]:
        Image.open(png).convert("RGB").save(jpgs / f"{png.stem}.jpg", quality=92)
    (jpgs / "notes.txt").write_text("not an image")
    frames = [np.asarray(Image.open(p)) for p in sorted((split / "Color_Images").iterdir())[:5]]
    with VideoWriter(root / "drive.mp4", 10, frames[0].shape[1], frames[0].shape[0]) as movie:
        for frame in frames:
            movie.write(frame)
    return root


PREDICT = ["--workers", "0", "--device", "cpu", "--batch-size", "2"]


def test_predict_jpeg_folder_glob_and_video(head, inputs, tmp_path):
    out = tmp_path / "pred"
    r = run("predict", head, inputs / "jpg", inputs / "drive.mp4", out, *PREDICT)
    assert r.exit_code == 0, r.output
    assert "skipped 1 file that is not" in r.stderr and "notes.txt" in r.stderr
    assert "predicted 4 images and 1 video (5 frames)" in r.stdout
    masks = sorted(p.name for p in (out / "masks").iterdir())
    stems = sorted(p.stem for p in (inputs / "jpg").glob("*.jpg"))
    assert [m for m in masks if not m.startswith("drive")] == [f"{s}.png" for s in stems]
    assert sum(m.startswith("drive_f") for m in masks) == 5
    assert (out / "overlays" / "drive.mp4").stat().st_size > 0
    overlay = np.asarray(Image.open(out / "overlays" / f"{stems[0]}.png"))
    assert overlay.shape[0] > 224 and overlay.shape[1] == 392  # the image, then a legend
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["videos"][0]["frames"] == 5 and len(summary["images"]) == 4
    # a glob, and every 2nd frame of the video
    out2 = tmp_path / "glob"
    r = run("predict", head, inputs / "jpg" / "*.jpg", inputs / "drive.mp4", out2, *PREDICT,
            "--frame-stride", "2", "--no-overlays")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "1 video (3 frames)" in r.stdout
    for name in masks:
        if not name.startswith("drive"):
            np.testing.assert_array_equal(read_mask(out2 / "masks" / name),
                                          read_mask(out / "masks" / name))  # fmt: skip


def test_killed_predict_resumes_to_identical_outputs(head, split, tmp_path):
    args = ["predict", head, split, None, "--workers", "0", "--device", "cpu", "--batch-size", "1"]
    reference = tmp_path / "reference"
    assert run(*[reference if a is None else a for a in args]).exit_code == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "offroad_seg", *[str(out if a is None else a) for a in args]]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stopped = kill_when(proc, out, at_least=3)
    assert 0 < stopped < N, f"not stopped half way ({stopped} of {N})"
    r = run(*[out if a is None else a for a in args])
    assert r.exit_code == 0, r.output
    assert f"predicted {N} images" in r.stdout
    for folder in ("masks", "masks_color", "overlays"):
        same_files(out, reference, folder)
    a, b = (json.loads((d / "predictions.json").read_text()) for d in (out, reference))
    assert {k: v for k, v in a.items() if k != "seconds"} == {
        k: v for k, v in b.items() if k != "seconds"
    }


def test_overwrite_replaces_another_runs_results(head, split, evaluated, tmp_path):
    out = tmp_path / "mixed"
    shutil.copytree(evaluated, out)
    (out / "my_notes.md").write_text("mine")
    r = run("predict", head, split / "Color_Images", out, *PREDICT)
    assert r.exit_code == 1
    assert "holds the results of another run (of evaluate; this is predict)" in r.stderr
    assert "None" not in r.stderr and "'" not in r.stderr
    r = run("predict", head, split / "Color_Images", out, *PREDICT, "--overwrite")
    assert r.exit_code == 0, r.output
    left = sorted(p.name for p in out.iterdir())
    assert left == sorted([".offroad-seg-run.json", "masks", "masks_color", "my_notes.md",
                           "overlays", "predictions.json", RECORDS_DIR])  # fmt: skip
