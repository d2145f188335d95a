"""The sweep's leaderboard: one row per finished trial (completed best first, then pruned, then
failed with the reason), written as leaderboard.csv, .md and .png, and the `best` link to
the best trial's run folder."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from offroad_seg.core.atomic import temp_path, write_text_atomic
from offroad_seg.training.sweep.folder import (
    BEST_LINK,
    ENSEMBLE_FILE,
    ENSEMBLE_SUMMARY,
    TRIALS_DIR,
)
from offroad_seg.training.sweep.space import format_value
from offroad_seg.training.sweep.study import failed_for_good


def best_row(rows: list[dict]) -> dict | None:
    """The leaderboard's best completed trial (failed and pruned ones never are)."""
    return rows[0] if rows and rows[0]["state"] == "complete" else None


def _trial_row(out: Path, trial) -> dict | None:
    """The trial's row from its run folder in `out`; None when `out` has no finished run of
    it: the trial ran on another machine (processes sharing a --storage each keep their own
    folder), where the retry of one killed here may have finished it; pruned runs stop early."""
    from optuna.trial import TrialState

    from offroad_seg.models.checkpoint import HEAD_FILE, load_checkpoint
    from offroad_seg.training.run_folder import FINISHED

    run = out / TRIALS_DIR / trial.user_attrs.get("run", "")
    head = run / HEAD_FILE
    if not head.is_file():
        return None
    record = json.loads((run / "train_stats" / "history.json").read_text())
    if trial.state == TrialState.COMPLETE and not record.get(FINISHED):
        return None  # an attempt killed here, not the run that completed the trial
    payload = load_checkpoint(head).payload
    history = record["history"]
    best = payload["best"]
    val = payload.get("val_metrics", {})
    row = {
        "run": trial.user_attrs["run"],
        "state": trial.state.name.lower(),
        **{k: format_value(v) for k, v in sorted(trial.params.items())},
        "val_miou": best["val_miou"],
        "val_dice": best["val_dice"],
        "val_pixel_acc": best["val_pixel_acc"],
        "best_epoch": best["epoch"],
        "epochs": len(history),
        "s_per_epoch": sum(h["seconds"] for h in history) / len(history),
    }
    for name, per_class in val.get("per_class", {}).items():
        row[f"iou {name}"] = per_class["iou"]
    return row


# A row's entries that are not the trial's swept settings.
_RESULT_KEYS = {"run", "state", "val_miou", "val_dice", "val_pixel_acc", "best_epoch", "epochs",
                "s_per_epoch", "error"}  # fmt: skip


def swept_settings(row: dict) -> dict[str, str]:
    """The settings a leaderboard row's trial was given (its parameters)."""
    return {k: v for k, v in row.items() if k not in _RESULT_KEYS and not k.startswith("iou ")}


def short_value(value: Any) -> str:
    """A setting for people: whole numbers as they are, others to 3 significant digits
    (lr 0.000316, not 0.000316227766)."""
    text = str(value)
    with contextlib.suppress(ValueError):
        int(text)
        return text
    try:
        return f"{float(text):.3g}"
    except ValueError:
        return text


def trial_label(row: dict) -> str:
    """'head=upnext, lr=0.000316': a trial's settings, short (the run folder's name is long)."""
    return ", ".join(f"{k}={short_value(v)}" for k, v in swept_settings(row).items()) or row["run"]


def top_table(rows: list[dict], out: Path, shown: int = 5) -> str:
    """The best trials for a terminal: rank, val mIoU and settings, then where the full
    leaderboard is (its markdown has every column, per-class IoU included)."""
    lines = [f"{'rank':>4}  {'val mIoU':>8}  settings"]
    for i, row in enumerate(rows[:shown], 1):
        score = "-" if row["val_miou"] is None else f"{row['val_miou']:.4f}"
        state = "" if row["state"] == "complete" else f" ({row['state']})"
        lines.append(f"{i:>4}  {score:>8}  {trial_label(row)}{state}")
    more = f"the best {shown} of {len(rows)}; " if len(rows) > shown else ""
    lines.append(f"({more}every trial and column: {out / 'leaderboard.md'})")
    return "\n".join(lines)


def _failed_row(trial) -> dict:
    return {
        "run": trial.user_attrs.get("run", ""),
        "state": "failed",
        **{k: format_value(v) for k, v in sorted(trial.params.items())},
        "val_miou": None,
        "error": trial.user_attrs.get("error", ""),
    }


_STATE_ORDER = {"complete": 0, "pruned": 1, "failed": 2}


def leaderboard_rows(out: Path, study) -> list[dict]:
    """One row per finished trial: completed ones best validation mIoU first, then pruned,
    then failed (no score; `error` says why)."""
    from optuna.trial import TrialState

    rows = []
    for trial in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)):
        row = _trial_row(out, trial)
        if row is not None:
            rows.append(row)
    for trial in study.get_trials(states=(TrialState.FAIL,)):
        if failed_for_good(trial) and "run" in trial.user_attrs:
            rows.append(_failed_row(trial))
    return sorted(rows, key=lambda r: (_STATE_ORDER[r["state"]], -(r["val_miou"] or 0.0), r["run"]))


def write_leaderboard(out: Path, study) -> list[dict]:
    """leaderboard.csv, .md and .png, and the `best` link to the best run's folder."""
    rows = leaderboard_rows(out, study)
    if not rows:
        return rows
    from offroad_seg.training.stats import history_csv

    keys = list(dict.fromkeys(k for row in rows for k in row))
    write_text_atomic(out / "leaderboard.csv", history_csv(rows))
    markdown = _markdown(rows, keys)
    summary = read_summary(out)
    if summary is not None:  # --ensemble-top: the ensemble beside the best trial
        markdown += f"\n{ensemble_line(summary)}\n"
    write_text_atomic(out / "leaderboard.md", markdown)
    _plot(out, [r for r in rows if r["val_miou"] is not None])
    best = best_row(rows)
    if best is not None:
        _link_best(out, Path(TRIALS_DIR) / best["run"])
    return rows


def _link_best(out: Path, target: Path) -> None:
    best = out / BEST_LINK
    current = os.readlink(best) if best.is_symlink() else None
    if current != str(target):
        tmp = temp_path(best)  # a killed writer's is removed by the next run
        tmp.symlink_to(target)
        os.replace(tmp, best)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")  # an error message must not split the table


def _markdown(rows: list[dict], keys: list[str]) -> str:
    lines = ["| rank | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for i, row in enumerate(rows, 1):
        lines.append(f"| {i} | " + " | ".join(_cell(row.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _plot(out: Path, rows: list[dict]) -> None:
    """leaderboard.png of the scored rows (failed trials have no score to draw)."""
    from offroad_seg.reporting.plots import plot_sweep

    if not rows:
        return

    labels = [f"#{rank} {trial_label(row)}" for rank, row in enumerate(rows, 1)]  # distinct
    curves = {}
    for label, row in list(zip(labels, rows, strict=True))[:5]:
        if row["state"] != "complete":
            break  # completed rows come first
        history = json.loads(
            (out / TRIALS_DIR / row["run"] / "train_stats" / "history.json").read_text()
        )["history"]
        curves[label] = [(h["epoch"], h.get("val_miou")) for h in history]
    plot_sweep(rows, curves, out / "leaderboard.png", title=out.name, labels=labels)


def ensemble_line(summary: dict[str, Any]) -> str:
    """'ensemble of the best 3 trials: val mIoU 0.5210 (best single trial 0.5100, a-1)'."""
    best = summary["best_single"]
    return (
        f"ensemble of the best {len(summary['members'])} trials ({ENSEMBLE_FILE}): val mIoU "
        f"{summary['val_miou']:.4f} (best single trial {best['val_miou']:.4f}, {best['run']})"
    )


def read_summary(out: Path) -> dict | None:
    """OUT/ensemble.json, when a sweep wrote one and it is readable."""
    try:
        return json.loads((out / ENSEMBLE_SUMMARY).read_text())
    except (OSError, ValueError):
        return None
