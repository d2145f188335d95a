"""Every run records what it was; presets; resume keeps a run's settings; `info`."""

from __future__ import annotations

import json
import shlex

import pytest
from click.testing import CliRunner

from offroad_seg.cli import cli
from offroad_seg.config import PRESETS
from offroad_seg.models.checkpoint import load_checkpoint
from tests.conftest import interrupted_in_epoch


def run(*args) -> CliRunner:
    return CliRunner().invoke(cli, [str(a) for a in args])


def train_args(caches, out, extra: str = "") -> list:
    return ["train", caches["train"], out, "--device", "cpu", *shlex.split(extra)]


@pytest.fixture(scope="module")
def finished(caches, tmp_path_factory):
    """A finished 2-epoch run with validation and a combined loss."""
    out = tmp_path_factory.mktemp("runs") / "h1"
    extra = f"--val-cache {caches['val']} --epochs 2 --batch-size 2 --loss ce+0.5dice --lr 1e-3"
    r = run(*train_args(caches, out, extra))
    assert r.exit_code == 0, r.output
    return out


def test_run_records_its_settings(finished, caches):
    config = json.loads((finished / "train_stats" / "config.json").read_text())
    settings = config["settings"]
    assert settings["loss"] == "ce+0.5dice" and settings["lr"] == 1e-3
    assert settings["epochs"] == 2 and settings["batch_size"] == 2
    assert config["head"]["name"] == "upnext" and config["head"]["width"] == 96  # the defaults
    assert config["backbone"]["name"] == "dinov2_vits14"
    assert config["train_caches"][0]["path"] == str(caches["train"])
    assert len(config["train_caches"][0]["fingerprint"]) == 64
    assert config["val_cache"]["path"] == str(caches["val"])
    text = (finished / "train_stats" / "evaluation_metrics.txt").read_text()
    assert "loss: ce+0.5dice" in text and "head: upnext" in text
    assert "lr 0.001" in text and f"val cache: {caches['val']}" in text


def test_info_prints_backbone_head_settings_and_best(finished):
    r = run("info", finished)
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "dinov2_vits14 layers=1 channels=384" in out
    assert "\nmodel        upnext (width 96, depth 2, dropout 0.1," in out
    assert "loss ce+0.5dice" in out and "None" not in out and "width 0" not in out
    best = load_checkpoint(finished / "segmentation_head.pth").payload["best"]
    assert f"val mIoU {best['val_miou']:.4f}" in out
    assert "class IoU" in out and "Sky" in out
    as_json = json.loads(run("info", finished / "segmentation_head.pth", "--json").stdout)
    assert as_json["settings"]["loss"] == "ce+0.5dice"
    assert as_json["best"]["epoch"] == best["epoch"]
    r = run("info", finished / "train_stats")
    assert r.exit_code == 1 and "no segmentation_head.pth" in r.stderr


def test_resume_keeps_the_runs_settings(finished, caches, tmp_path):
    # nothing left: said plainly, nothing retrained
    before = (finished / "last.pth").stat().st_mtime_ns
    r = run(*train_args(caches, finished, "--resume"))
    assert r.exit_code == 0, r.output
    assert "all 2 epochs were already trained; nothing to do" in r.stdout
    assert r.output.count("nothing to do") == 1
    assert (finished / "last.pth").stat().st_mtime_ns == before
    # a setting that would change the run is refused by name
    r = run(*train_args(caches, finished, "--resume --lr 5e-4"))
    assert r.exit_code == 1
    assert "--lr 0.001" in r.stderr and "--lr 0.0005 is refused" in r.stderr
    r = run(*train_args(caches, finished, "--resume --epochs 10"))
    assert r.exit_code == 1 and "trained with --epochs 2" in r.stderr
    # the run's own values repeated are fine, and --val-cache may be left out
    r = run(*train_args(caches, finished, "--resume --loss ce+0.5dice --lr 1e-3"))
    assert r.exit_code == 0, r.output


def test_resume_without_val_cache_continues_the_run(caches, tmp_path):
    opts = f"--val-cache {caches['val']} --epochs 3 --batch-size 3"
    assert run(*train_args(caches, tmp_path / "full", opts)).exit_code == 0
    with interrupted_in_epoch(2):
        r = run(*train_args(caches, tmp_path / "part", opts))
    assert r.exit_code == 130 and "--resume" in r.stderr
    r = run(*train_args(caches, tmp_path / "part", "--resume"))  # no --val-cache, no --epochs
    assert r.exit_code == 0, r.output
    assert "trained epochs 2-3" in r.stdout
    full, part = (
        json.loads((tmp_path / name / "train_stats" / "history.json").read_text())["history"]
        for name in ("full", "part")
    )
    assert [h["val_miou"] for h in part] == [h["val_miou"] for h in full]
    assert [h["train_loss"] for h in part] == [h["train_loss"] for h in full]


def test_preset_seed_reproduces_the_seed_settings(caches, tmp_path):
    out = tmp_path / "seed"
    r = run(*train_args(caches, out, "--preset seed --epochs 1"))  # an explicit option wins
    assert r.exit_code == 0, r.output
    settings = json.loads((out / "train_stats" / "config.json").read_text())["settings"]
    for name, value in PRESETS["seed"].items():
        if name != "epochs":
            assert settings[name] == value, name
    assert settings["epochs"] == 1 and settings["preset"] == "seed"
    assert load_checkpoint(out / "segmentation_head.pth").head_config.name == "seed"
    assert "(preset seed)" in (out / "train_stats" / "evaluation_metrics.txt").read_text()


def test_bad_loss_is_one_line(caches, tmp_path):
    r = run(*train_args(caches, tmp_path / "x", "--loss ce+0.5iou"))
    assert r.exit_code == 2  # a usage error, before any work
    assert "unknown term 'iou'" in r.output and "ce, focal, dice, lovasz" in r.output
