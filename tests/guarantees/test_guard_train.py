"""`train` run folders under hostile conditions (issue #21): concurrent writers, validation
data in training, damaged or diverged checkpoints, a first checkpoint that cannot be written,
a kill while the final stats are written, dead writers' temporary files, NaN losses."""

from __future__ import annotations

import errno
import json
import os
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

import offroad_seg.training.loop as th
import offroad_seg.training.stats as run_stats
from offroad_seg.cli import cli
from offroad_seg.core.atomic import temp_path
from offroad_seg.core.lock import LOCK_NAME
from offroad_seg.data.classes import ClassMap
from offroad_seg.data.dataset import list_samples
from offroad_seg.errors import CacheError, OffroadSegError, TrainingDiverged
from offroad_seg.features.cache import FeatureCache
from offroad_seg.features.extract import extract
from offroad_seg.models.checkpoint import DIGEST_KEY, head_payload, load_checkpoint, save_checkpoint
from offroad_seg.models.heads import HeadConfig, build_head
from offroad_seg.models.preprocess import Preprocessing
from offroad_seg.training.holdout import validation_word
from offroad_seg.training.inputs import open_train_caches
from offroad_seg.training.loop import TrainConfig, train
from tests.conftest import SIZE, extract_config

STATS = ("history.csv", "evaluation_metrics.txt", "training_curves.png", "per_class_metrics.png")


def config(caches, out: Path, **kw) -> TrainConfig:
    """A fast run: the linear head (never the slow default pyramid), 2 epochs, on the CPU."""
    defaults = dict(head="linear", epochs=2, batch_size=2, device="cpu", progress=False)
    return TrainConfig(caches=(caches["train"],), out=out, **{**defaults, **kw})


def cli_args(caches, out: Path, *extra, epochs: int = 2, train_caches=None) -> list[str]:
    """A fast `train` command line (as `config`)."""
    sources = train_caches or [caches["train"]]
    base = ["train", *sources, out, "--head", "linear", "--device", "cpu"]
    return [str(a) for a in (*base, "--epochs", epochs, *extra)]


def run_cli(*args) -> CliRunner:
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), result.stderr
    for needle in needles:
        assert needle in line, line
    return line


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).payload["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def reference(caches, tmp_path_factory) -> Path:
    """An uninterrupted 2-epoch run with validation: what every recovered run must equal."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(config(caches, out, val_cache=caches["val"]))
    return out


# ----------------------------------------------------------------------------- 5: one writer


def test_second_train_into_the_same_folder_is_refused(caches, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "offroad_seg", *cli_args(caches, out, epochs=500)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.pth").exists() and first.poll() is None:
            assert time.monotonic() < deadline, "the first run saved no epoch"
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)  # frozen while it holds the folder
        config_before = (out / "train_stats" / "config.json").read_bytes()
        r = run_cli(*cli_args(caches, out, "--lr", "1e-3"))
        owner = "another `offroad-seg train` is writing this run folder"
        assert_one_line_error(r, str(out), owner, f"pid {first.pid}")
        r = run_cli(*cli_args(caches, out, "--resume"))  # nor may it be resumed meanwhile
        assert_one_line_error(r, f"pid {first.pid}")
        assert (out / "train_stats" / "config.json").read_bytes() == config_before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the kernel released the dead owner's lock: the next command gets past it at once (and
    # is told what the run was: resumed with another --epochs, it is refused by name)
    r = run_cli(*cli_args(caches, out, "--resume", epochs=3))
    assert_one_line_error(r, "trained with --epochs 500")


def test_lock_is_held_for_the_whole_run_and_released(caches, tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen = []
    real = th.train_one_epoch

    def one_epoch_checking_the_lock(*args, **kw):
        from offroad_seg.core.lock import writer_lock

        with pytest.raises(CacheError, match="another `offroad-seg train`"), writer_lock(out):
            pass
        seen.append(True)
        return real(*args, **kw)

    monkeypatch.setattr(th, "train_one_epoch", one_epoch_checking_the_lock)
    train(config(caches, out))
    assert len(seen) == 2
    assert not (out / LOCK_NAME).exists()


def test_refused_run_leaves_no_folder(caches, tmp_path):
    out = tmp_path / "new" / "run"
    r = run_cli(*cli_args(caches, out, "--val-cache", caches["train"]))
    assert_one_line_error(r, "is also a training cache")
    assert list(tmp_path.iterdir()) == []  # neither run/ nor new/ that the lock made


# ----------------------------------------------------------------------------- 6: val data


def test_validating_on_the_training_cache_is_refused(caches, tmp_path):
    # the issue's `train val.zarr runs/x --val-cache val.zarr`
    r = run_cli("train", caches["val"], tmp_path / "x", "--val-cache", caches["val"])
    assert_one_line_error(r, str(caches["val"]), "is also a training cache")
    # the same cache under another spelling of its path
    other = Path(os.path.relpath(caches["val"]))
    with pytest.raises(CacheError, match="is also a training cache"):
        open_train_caches(config({"train": caches["val"]}, tmp_path / "y", val_cache=other))


def test_validation_cache_holding_training_images_is_refused(caches, tmp_path):
    copy = tmp_path / "copy-of-train.zarr"
    shutil.copytree(caches["train"], copy)
    r = run_cli(*cli_args(caches, tmp_path / "x", "--val-cache", copy))
    line = assert_one_line_error(r, str(copy), "holds images of the training cache")
    first = FeatureCache.open(caches["train"]).spec.names[0]
    assert f"({first} and 5 more)" in line
    assert not (tmp_path / "x").exists()
    # the control: the real validation split shares no image with training and is accepted
    caches_, val = open_train_caches(config(caches, tmp_path / "y", val_cache=caches["val"]))
    assert val is not None and len(caches_) == 1


def test_same_names_with_other_masks_are_not_the_same_images(caches, dataset, tmp_path):
    """Two datasets may both hold `cc0000012.png`: images are the same only when their labels
    are; a copy of the val split whose masks are rotated between its files passes."""
    other = tmp_path / "other"
    shutil.copytree(dataset / "val", other)
    masks = [s.mask for s in list_samples(other)]
    data = [m.read_bytes() for m in masks]
    for m, d in zip(masks, data[1:] + data[:1], strict=True):
        m.write_bytes(d)
    cache = tmp_path / "other.zarr"
    extract(extract_config(other, cache))
    _, val = open_train_caches(config({"train": caches["val"]}, tmp_path / "y", val_cache=cache))
    assert val is not None
    # and with the original masks (an extraction of the same folder) it is refused
    same = tmp_path / "same.zarr"
    extract(extract_config(dataset / "val", same, views=("identity", "hflip")))
    with pytest.raises(CacheError, match="holds images of the training cache"):
        open_train_caches(config({"train": caches["val"]}, tmp_path / "z", val_cache=same))


def test_validation_like_training_cache_warns(caches, tmp_path):
    # the issue's `train train.zarr val.zarr runs/x`: val passed as a second training cache
    both = [caches["train"], caches["val"]]
    r = run_cli(*cli_args(caches, tmp_path / "x", train_caches=both))
    assert r.exit_code == 0, r.output
    warning = [line for line in r.stderr.splitlines() if "--val-cache instead" in line]
    assert len(warning) == 1 and str(caches["val"]) in warning[0] and "'val'" in warning[0]
    r = run_cli(*cli_args(caches, tmp_path / "y"))
    assert r.exit_code == 0 and "--val-cache instead" not in r.stderr


@pytest.mark.parametrize(
    "path, word",
    [
        ("cache/val.zarr", "val"),
        ("data/validation/features.zarr", "validation"),
        ("/x/Test/a.zarr", "Test"),
        ("cache/train-valid.zarr", "valid"),
        ("s3://bucket/val/t.zarr", "val"),
        ("cache/train.zarr", None),
        ("/tmp/pytest-of-u/pytest-3/test_resume0/train.zarr", None),  # a test's folder name
        ("cache/interval.zarr", None),
    ],
)
def test_validation_word(path, word):
    assert validation_word(path) == word


# ----------------------------------------------------------------------------- 7c: head digest


def small_head(path: Path, **state) -> Path:
    torch.manual_seed(0)
    cfg = HeadConfig(name="linear", in_channels=384, num_classes=11)
    module = build_head(cfg)
    sd = {**module.state_dict(), **state}
    from offroad_seg.models.backbone import load_backbone

    spec = load_backbone("random").spec
    payload = head_payload(cfg, ClassMap.default(), spec, Preprocessing(size=SIZE), state_dict=sd)
    save_checkpoint(path, payload)
    return path


def flip_a_weight_byte(path: Path, name: str) -> None:
    """Flip one byte inside tensor `name`'s data in the file (stored uncompressed)."""
    tensor = torch.load(path, weights_only=True)["state_dict"][name]
    blob = bytearray(path.read_bytes())
    raw = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    at = blob.find(raw)
    assert at >= 0 and blob.find(raw, at + 1) < 0
    blob[at + len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(blob))


def test_flipped_byte_in_head_weights_is_refused(tmp_path):
    path = small_head(tmp_path / "h.pth")
    payload = torch.load(path, weights_only=True)
    assert len(payload[DIGEST_KEY]) == 64
    load_checkpoint(path)  # intact: loads
    flip_a_weight_byte(path, "classifier.weight")
    with pytest.raises(OffroadSegError, match=r"h\.pth: the head weights do not match the digest"):
        load_checkpoint(path)
    r = run_cli("info", path)
    assert_one_line_error(r, str(path), "do not match the digest")


def test_checkpoint_without_digest_still_loads(tmp_path):
    """Heads saved before the digest existed load as before (and a flip in them is, as before,
    not noticed: the control that shows the digest is what catches it)."""
    path = small_head(tmp_path / "old.pth")
    payload = torch.load(path, weights_only=True)
    del payload[DIGEST_KEY]
    torch.save(payload, path)
    assert load_checkpoint(path).build() is not None
    flip_a_weight_byte(path, "classifier.weight")
    load_checkpoint(path)


def test_non_finite_weights_are_refused_on_load(tmp_path):
    bad = torch.full((11,), float("nan"))
    path = small_head(tmp_path / "nan.pth", **{"classifier.bias": bad})
    r = run_cli("info", path)
    assert_one_line_error(r, str(path), "classifier.bias holds NaN or inf", "--lr")


# ----------------------------------------------------------------------------- 9: first save


def fail_first_last_save(monkeypatch, exc: BaseException) -> None:
    """The first last.pth write fails (disk full, or killed) after the first head was saved."""
    real = th.save_checkpoint
    state = {"failed": False}

    def save(path, payload):
        if Path(path).name == "last.pth" and not state["failed"]:
            state["failed"] = True
            raise exc
        return real(path, payload)

    monkeypatch.setattr(th, "save_checkpoint", save)


@pytest.mark.parametrize("rerun", ["plain", "resume"])
def test_first_checkpoint_write_fails_then_rerun_recovers(
    rerun, caches, reference, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    args = cli_args(caches, out, "--val-cache", caches["val"], "--batch-size", "2")
    disk_full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "last.pth"))
    fail_first_last_save(monkeypatch, disk_full)
    r = run_cli(*args)
    assert_one_line_error(r, "last.pth", "No space left on device")
    monkeypatch.undo()
    # what the failure left: the run record and epoch 1's head, no last.pth
    assert not (out / "last.pth").exists() and (out / "segmentation_head.pth").exists()
    r = run_cli(*args, *(["--resume"] if rerun == "resume" else []))
    assert r.exit_code == 0, r.output
    assert "nothing to resume" not in r.output and "already holds" not in r.output
    assert "trained 2 epochs" in r.stdout
    for name in ("last.pth", "segmentation_head.pth"):
        assert_same_weights(out / name, reference / name)
    assert untimed_history(out) == untimed_history(reference)
    assert all((out / "train_stats" / name).stat().st_size > 0 for name in STATS)


def untimed_history(run: Path) -> list[dict]:
    """A run's history without the seconds each epoch took (the one thing runs differ in)."""
    rows = json.loads((run / "train_stats" / "history.json").read_text())["history"]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_killed_before_first_checkpoint_subprocess_then_resume(caches, tmp_path):
    """kill -9 at the first last.pth write (the process stops itself there), then --resume."""
    out = tmp_path / "run"
    hook = tmp_path / "hook.py"
    hook.write_text(
        "import os, signal, sys\n"
        "import offroad_seg.training.loop as th\n"
        "real = th.save_checkpoint\n"
        "def save(path, payload):\n"
        "    if str(path).endswith('last.pth'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(path, payload)\n"
        "th.save_checkpoint = save\n"
        "from offroad_seg.cli import main\n"
        "sys.argv = ['offroad-seg'] + sys.argv[1:]\n"
        "main()\n"
    )
    args = cli_args(caches, out)
    killed = subprocess.run([sys.executable, str(hook), *args], capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "last.pth").exists()
    r = run_cli(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert "trained 2 epochs" in r.stdout
    assert load_checkpoint(out / "last.pth").payload["epoch"] == 2


def test_resume_of_an_empty_folder_says_what_to_do(caches, tmp_path):
    r = run_cli(*cli_args(caches, tmp_path / "nothing", "--resume"))
    assert_one_line_error(r, "nothing to resume", "train without --resume")


def test_a_head_the_tool_cannot_place_is_never_removed(caches, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    mine = small_head(out / "segmentation_head.pth")
    before = mine.read_bytes()
    r = run_cli(*cli_args(caches, out))
    assert_one_line_error(r, "already holds a trained head", "--overwrite")
    assert mine.read_bytes() == before


# ----------------------------------------------------------------------------- 10: final stats


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler sees it."""


def test_killed_while_writing_the_stats_then_resume_writes_them(
    caches, reference, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    cfg = config(caches, out, val_cache=caches["val"])

    def killed(history):
        raise Killed

    monkeypatch.setattr(run_stats, "history_csv", killed)  # the first of the final stats writes
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.undo()
    stats = out / "train_stats"
    assert not any((stats / name).exists() for name in STATS)
    before = (out / "last.pth").stat().st_mtime_ns
    r = run_cli(*cli_args(caches, out, "--val-cache", caches["val"], "--resume"))
    assert r.exit_code == 0, r.output
    assert "nothing to do" not in r.output and "wrote the missing" in r.stdout
    assert (out / "last.pth").stat().st_mtime_ns == before  # no retraining
    assert untimed_history(out) == untimed_history(reference)
    csv = (stats / "history.csv").read_text().splitlines()
    assert csv[0].endswith(",lr,seconds") and len(csv) == 3
    for name in STATS:
        assert (stats / name).stat().st_size > 0
    assert json.loads((stats / "history.json").read_text())["finished"] is True
    r = run_cli(*cli_args(caches, out, "--val-cache", caches["val"], "--resume"))
    assert r.exit_code == 0 and "nothing to do" in r.stdout


@pytest.mark.parametrize("rerun", ["resume", "same command"])
def test_missing_stats_are_rewritten_byte_equal(rerun, caches, tmp_path):
    """An uninterrupted run's stats, then the state a kill in the final write leaves (stats
    gone, history.json as after the last epoch): the rerun writes byte-equal csv and txt."""
    out = tmp_path / "run"
    args = cli_args(caches, out, "--val-cache", caches["val"])
    assert run_cli(*args).exit_code == 0
    stats = out / "train_stats"
    expected = {name: (stats / name).read_bytes() for name in STATS}
    history = json.loads((stats / "history.json").read_text())
    for name in STATS:
        (stats / name).unlink()
    (stats / "history.json").write_text(json.dumps({"history": history["history"]}))
    before = (out / "last.pth").stat().st_mtime_ns
    r = run_cli(*args, *(["--resume"] if rerun == "resume" else []))
    assert r.exit_code == 0, r.output
    assert "all 2 epochs were already trained; wrote the missing" in r.stdout
    assert (out / "last.pth").stat().st_mtime_ns == before
    for name in ("history.csv", "evaluation_metrics.txt"):
        assert (stats / name).read_bytes() == expected[name], name
    assert json.loads((stats / "history.json").read_text()) == history
    # finished now: the same command is refused again, --resume has nothing to do
    assert_one_line_error(run_cli(*args), "already holds a trained head")


# ----------------------------------------------------------------------------- 11: temp files


def test_dead_writers_temp_files_are_removed_by_the_next_run(caches, tmp_path):
    out = tmp_path / "run"
    (out / "train_stats").mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    mine = str(os.getpid())

    def leftover(path: Path, pid: str) -> Path:
        name = temp_path(path).name
        host_pid = name.split(".")[-3]
        temp = path.with_name(name.replace(host_pid, host_pid.rsplit("-", 1)[0] + "-" + pid))
        temp.write_bytes(b"x" * 100)
        return temp

    stale = [
        leftover(out / "last.pth", dead),
        leftover(out / "segmentation_head.pth", dead),
        leftover(out / "train_stats" / "history.json", dead),
    ]
    live = leftover(out / "last.pth", mine)  # a live writer's (this process): kept
    user = out / ".last.pth.notes.tmp"
    user.write_text("a user's file")
    r = run_cli(*cli_args(caches, out))
    assert r.exit_code == 0, r.output
    assert not any(p.exists() for p in stale)
    assert live.exists() and user.read_text() == "a user's file"


# ----------------------------------------------------------------------------- 12: NaN


def test_nan_at_epoch_2_stops_and_keeps_epoch_1(caches, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = th.train_one_epoch

    def poisoned(model, *args, **kw):
        losses, lr = real(model, *args, **kw)
        if args[3] == 2:  # epoch
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return losses, lr

    monkeypatch.setattr(th, "train_one_epoch", poisoned)
    seen = []
    with pytest.raises(TrainingDiverged) as caught:
        train(config(caches, out, epochs=3, val_cache=caches["val"]), on_epoch=seen.append)
    assert caught.value.epoch == 2 and [r["epoch"] for r in seen] == [1]
    message = str(caught.value)
    assert "became NaN/inf at epoch 2" in message and "epoch 1" in message
    assert str(out / "last.pth") in message and "lower --lr" in message
    for name in ("last.pth", "segmentation_head.pth"):
        ckpt = load_checkpoint(out / name)  # finite: it loads
        assert ckpt.payload["epoch"] == 1
    history = json.loads((out / "train_stats" / "history.json").read_text(), parse_constant=_no)
    assert [r["epoch"] for r in history["history"]] == [1]


def _no(constant):
    raise AssertionError(f"{constant} in JSON")


def test_huge_lr_diverges_with_one_line(caches, tmp_path):
    out = tmp_path / "run"
    r = run_cli(*cli_args(caches, out, "--lr", "1e6", epochs=5))
    line = assert_one_line_error(r, "training diverged", "NaN/inf at epoch", "--lr")
    epoch = int(line.split("at epoch ")[1].split(";")[0].split(",")[0])
    assert "it was 1e+06" in line
    for path in (out / "train_stats").glob("*.json"):
        json.loads(path.read_text(), parse_constant=_no)
    if epoch > 1:
        kept = load_checkpoint(out / "last.pth").payload
        assert kept["epoch"] == epoch - 1
        assert all(bool(torch.isfinite(t).all()) for t in kept["state_dict"].values())
    else:
        assert not (out / "last.pth").exists()
    # a rerun with a sane lr into the same folder: an epoch-1 divergence left no epoch, so it
    # starts over; a later one needs --overwrite, as the message says
    fix = ["--overwrite"] if epoch > 1 else []
    r = run_cli(*cli_args(caches, out, "--lr", "1e-3", *fix, epochs=5))
    assert r.exit_code == 0, r.output
    history = json.loads((out / "train_stats" / "history.json").read_text())["history"]
    assert len(history) == 5 and np.isfinite(history[-1]["train_loss"])
