"""Sweeps on the cache: grids, sampled searches, resuming after kill -9, two processes on one
study, and `compare`."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from offroad_seg.cli import cli
from offroad_seg.errors import ConfigError
from offroad_seg.training.sweep.space import parse_grid, parse_range, trial_slug

GRID = ["--grid", "lr=1e-3,3e-3", "--grid", "head=convnext,linear"]


def run(*args) -> CliRunner:
    return CliRunner().invoke(cli, [str(a) for a in args])


def sweep_args(caches, out, *extra) -> list:
    return ["sweep", caches["train"], out, "--val-cache", caches["val"], "--epochs", "2",
            "--device", "cpu", *extra]  # fmt: skip


def leaderboard(out: Path) -> list[dict]:
    with open(out / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row.pop("s_per_epoch")  # a time, not a result
    return rows


@pytest.fixture(scope="module")
def grid_sweep(caches, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "grid"
    r = run(*sweep_args(caches, out, *GRID))
    assert r.exit_code == 0, r.output
    (out.parent / "output.txt").write_text(r.output)  # what the user saw
    return out


def trial_lines(output: str) -> list[tuple[int, str]]:
    """(number, run folder) of each 'trial N/4: RUN' line a sweep printed."""
    found = re.findall(r"^trial (\d+)/4: ([^ ]+)$", output, flags=re.M)
    return [(int(n), slug) for n, slug in found]


def grid_slug(number: int) -> str:
    """The run folder of GRID's point `number` (1-based, in the grid's order)."""
    from offroad_seg.config import SweepConfig, TrainConfig
    from offroad_seg.training.sweep.space import grid_points

    points = grid_points(
        SweepConfig(TrainConfig(caches=("c",), out=Path("o")), grid=tuple(GRID[1::2]))
    )
    return trial_slug(points[number - 1])


def test_grid_sweep_writes_runs_leaderboard_and_best(grid_sweep):
    runs = sorted(p.name for p in (grid_sweep / "trials").iterdir())
    assert len(runs) == 4
    for run_dir in runs:
        assert (grid_sweep / "trials" / run_dir / "segmentation_head.pth").is_file()
        assert (grid_sweep / "trials" / run_dir / "train_stats" / "config.json").is_file()
    rows = leaderboard(grid_sweep)
    assert sorted(r["run"] for r in rows) == runs
    assert {(r["head"], r["lr"]) for r in rows} == {
        (h, lr) for h in ("convnext", "linear") for lr in ("0.001", "0.003")
    }
    scores = [float(r["val_miou"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert "iou Sky" in rows[0] and float(rows[0]["val_dice"]) > 0
    assert (grid_sweep / "best").resolve() == (grid_sweep / "trials" / rows[0]["run"]).resolve()
    assert (grid_sweep / "leaderboard.png").stat().st_size > 10_000
    assert "| rank |" in (grid_sweep / "leaderboard.md").read_text()
    assert not (grid_sweep / ".sweep.lock").exists()  # removed by the last process to let go
    # trials numbered 1 to 4 in the grid's order, each with its run folder and its score
    output = (grid_sweep.parent / "output.txt").read_text()
    assert trial_lines(output) == [(n, grid_slug(n)) for n in (1, 2, 3, 4)]
    assert len(re.findall(r"^trial \d/4: val mIoU 0\.\d{4}$", output, flags=re.M)) == 4


def test_rerun_of_a_finished_sweep_trains_nothing(grid_sweep, caches):
    before = leaderboard(grid_sweep)
    r = run(*sweep_args(caches, grid_sweep, *GRID))
    assert r.exit_code == 0, r.output
    assert "0 trials trained by this process" in r.stdout
    assert leaderboard(grid_sweep) == before
    # the best trials, compact (the 22-column table stays in leaderboard.md)
    lines = r.stdout.splitlines()
    assert lines[0] == "rank  val mIoU  settings" and "|" not in r.stdout
    assert lines[1] == f"   1    {float(before[0]['val_miou']):.4f}  " + ", ".join(
        f"{k}={before[0][k]}" for k in ("head", "lr")
    )
    assert lines[5] == f"(every trial and column: {grid_sweep / 'leaderboard.md'})"
    # another sweep into the same folder is refused
    r = run(*sweep_args(caches, grid_sweep, "--grid", "lr=1e-2,1e-3"))
    assert r.exit_code == 1 and "holds another sweep" in r.stderr


def test_compare_prints_the_differing_settings(grid_sweep):
    rows = leaderboard(grid_sweep)
    a, b = (grid_sweep / "trials" / r["run"] for r in rows[:2])
    r = run("compare", a, b, "--markdown", "--plot", grid_sweep.parent / "compare.png")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "settings that differ" in out and "val mIoU" in out and "| Sky |" in out
    differing = {k for k in ("lr", "head") if rows[0][k] != rows[1][k]}
    for key in differing:
        assert f"| {key} |" in out
    assert "| epochs |" not in out  # the same in both: not shown
    assert (grid_sweep.parent / "compare.png").exists()


def test_info_and_compare_show_the_settings_each_head_has_as_built(grid_sweep):
    from offroad_seg.reporting.compare import comparison_table, summarize

    rows = leaderboard(grid_sweep)
    by_head = {r["head"]: grid_sweep / "trials" / r["run"] for r in rows}
    runs = [summarize(by_head["convnext"]), summarize(by_head["linear"])]
    # resolved (the run asked for width 0 and dropout None: the head's defaults)
    assert runs[0].settings["width"] == 96 and runs[0].settings["dropout"] == 0.1
    assert runs[0].settings["kernel_size"] == 7 and runs[1].settings["dropout"] == 0.0
    assert not {"width", "depth", "kernel_size", "mlp_ratio"} & set(runs[1].settings)
    table = comparison_table(runs, markdown=True)
    assert "| width | 96 | - |" in table and "| depth | 2 | - |" in table
    assert "| dropout | 0.1 | 0 |" in table and table.count("dropout") == 1
    assert "head." not in table and "None" not in table
    linear = run("info", by_head["linear"]).stdout
    assert "\nmodel        linear (dropout 0)\n" in linear
    assert not any(word in linear for word in ("width", "kernel_size", "None", "preset"))
    # settings of tuning runs are not listed for a head on a frozen backbone; 0 says off
    assert "lora_rank" not in linear and "checkpointing" not in linear
    assert "patience off, ema off" in linear
    convnext = run("info", by_head["convnext"]).stdout
    assert "convnext (width 96, depth 2, dropout 0.1, kernel_size 7, mlp_ratio 4," in convnext


def sweep_command(caches, out, *extra) -> list[str]:
    return [sys.executable, "-m", "offroad_seg", *map(str, sweep_args(caches, out, *extra))]


def test_killed_sweep_resumes_to_the_same_leaderboard(grid_sweep, caches, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(sweep_command(caches, out, *GRID), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        runs = list((out / "trials").glob("*/train_stats/history.json"))
        if len(runs) >= 2:  # the second trial has finished an epoch
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "leaderboard.csv").exists() or len(leaderboard(out)) < 4
    r = run(*sweep_args(caches, out, *GRID))
    assert r.exit_code == 0, r.output
    assert leaderboard(out) == leaderboard(grid_sweep)
    # the trials run again are numbered as their grid points, not by optuna's counter (which
    # the interrupted trial and its retry both advanced)
    resumed = trial_lines(r.output)
    assert resumed and all(slug == grid_slug(n) for n, slug in resumed)


def test_two_processes_share_a_study_without_running_a_trial_twice(caches, tmp_path):
    import optuna

    out = tmp_path / "shared"
    grid = ["--grid", "lr=1e-3,2e-3,3e-3", "--grid", "head=linear,convnext"]
    procs = [
        subprocess.Popen(
            sweep_command(caches, out, *grid),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    study = optuna.load_study(
        study_name="offroad-seg-sweep", storage=f"sqlite:///{out / 'study.db'}"
    )
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 6
    assert len({t.user_attrs["run"] for t in done}) == 6  # no setting twice
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    assert len(leaderboard(out)) == 6


def test_sampled_search_runs_the_asked_number_of_trials(caches, tmp_path):
    out = tmp_path / "tpe"
    r = run(*sweep_args(caches, out, "--range", "lr=1e-4:1e-2:log", "--choice",
                        "head=linear,convnext", "--trials", "3", "--prune"))  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = leaderboard(out)
    assert len(rows) == 3
    assert all(1e-4 <= float(row["lr"]) <= 1e-2 for row in rows)


def test_a_pruned_trial_says_so_in_one_line(caches, tmp_path, monkeypatch, caplog):
    import logging

    import optuna

    from offroad_seg.config import SweepConfig, TrainConfig
    from offroad_seg.training import loop
    from offroad_seg.training.sweep import run as sweep_run

    study = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=1.0)
    )  # every score is below 1: the first report prunes
    cfg = SweepConfig(TrainConfig(caches=(caches["train"],), out=tmp_path), grid=("lr=1e-3,3e-3",))
    study.enqueue_trial({"lr": 3e-3}, user_attrs={"queued": True})

    def one_epoch(cfg, data, on_epoch, world):
        on_epoch({"epoch": 1, "val_miou": 0.25})
        raise AssertionError("not pruned")

    monkeypatch.setattr(loop, "train", one_epoch)
    logger = logging.getLogger(sweep_run.__name__)
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger=sweep_run.__name__):
            result = sweep_run.SweepResult(tmp_path, [], 0, 0.0)
            dist = {"lr": optuna.distributions.CategoricalDistribution([1e-3, 3e-3])}
            sweep_run._run_trial(study, study.ask(), cfg, dist, None, result, 2)
    finally:
        logger.removeHandler(caplog.handler)
    messages = [r.getMessage() for r in caplog.records]
    assert result.pruned == 1 and messages[-1] == (
        "trial 2/2: pruned after epoch 1 (val mIoU 0.2500, below the median of earlier trials)"
    )


def test_trial_labels_and_the_top_table_are_short():
    from offroad_seg.training.sweep.leaderboard import top_table, trial_label

    row = {"run": "x", "state": "complete", "lr": "0.000316227766", "width": "1024",
           "head": "upnext", "val_miou": 0.5, "iou Sky": 0.9}  # fmt: skip
    assert trial_label(row) == "lr=0.000316, width=1024, head=upnext"
    rows = [dict(row, val_miou=0.5 - i / 100) for i in range(7)]
    rows[6] = dict(rows[6], state="pruned")
    table = top_table(rows, Path("s")).splitlines()
    assert len(table) == 7 and table[5].startswith("   5    0.4600  lr=0.000316")
    assert table[6] == "(the best 5 of 7; every trial and column: s/leaderboard.md)"


def test_search_space_parsing():
    assert parse_grid(("lr=1e-3,3e-3", "head=baseline,linear", "class_weights=auto;none")) == {
        "lr": [1e-3, 3e-3],
        "head": ["seed", "linear"],
        "class_weights": ["auto", "none"],
    }
    assert parse_grid(("loss=ce,ce+0.5dice",))["loss"] == ["ce", "ce+0.5dice"]
    with pytest.raises(ConfigError, match="cannot be swept"):
        parse_grid(("caches=a,b",))
    with pytest.raises(ConfigError, match="expected a number"):
        parse_grid(("lr=fast",))
    r = parse_range("width=32:256:int")
    assert (r.low, r.high, r.scale) == (32, 256, "int")
    with pytest.raises(ConfigError, match="LOW < HIGH"):
        parse_range("lr=0:1e-2:log")
    assert trial_slug({"lr": 1e-3, "head": "linear"}) == trial_slug({"head": "linear", "lr": 1e-3})
    assert trial_slug({"lr": 1e-3}) != trial_slug({"lr": 3e-3})


def test_ensemble_top_2_is_reported_beside_the_best_trial(grid_sweep, caches):
    """A finished sweep rerun with --ensemble-top trains nothing and writes the ensemble."""
    import json

    import torch

    from offroad_seg.features.cache import FeatureCache
    from offroad_seg.models.checkpoint import load_checkpoint
    from offroad_seg.training.validation import evaluate_on_cache

    r = run(*sweep_args(caches, grid_sweep, *GRID, "--ensemble-top", "2"))
    assert r.exit_code == 0, r.output
    assert "0 trials trained by this process" in r.stdout
    rows = leaderboard(grid_sweep)
    summary = json.loads((grid_sweep / "ensemble.json").read_text())
    assert summary["members"] == [rows[0]["run"], rows[1]["run"]]
    assert summary["best_single"]["run"] == rows[0]["run"]
    assert summary["best_single"]["val_miou"] == pytest.approx(float(rows[0]["val_miou"]))
    ckpt = load_checkpoint(grid_sweep / "ensemble.pth")
    assert [c.name for c in ckpt.members] == [rows[0]["head"], rows[1]["head"]]
    val = FeatureCache.open(caches["val"])
    fresh = evaluate_on_cache(ckpt.build(), val, torch.device("cpu"), None)
    assert summary["val_miou"] == pytest.approx(fresh.miou, abs=1e-9)
    best = float(rows[0]["val_miou"])
    line = f"val mIoU {summary['val_miou']:.4f} (best single trial {best:.4f}, {rows[0]['run']})"
    assert line in r.stdout and line in (grid_sweep / "leaderboard.md").read_text()
