"""`offroad-seg compare`: runs side by side, the settings that differ and their metrics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offroad_seg.errors import OffroadSegError
from offroad_seg.models.checkpoint import HEAD_FILE, load_checkpoint, resolve_head
from offroad_seg.reporting.info import setting_text, trained_settings

# Settings that say how a machine ran a run, not what was trained (info's bookkeeping is out).
_NOT_COMPARED = ("device", "memory_budget_gb", "stream", "tensorboard")


@dataclass
class RunSummary:
    name: str
    path: Path
    settings: dict[str, Any]
    metrics: dict[str, float | None]  # best epoch's val mIoU, Dice, pixel accuracy, loss
    class_iou: dict[str, float | None]


def summarize(path: str | Path) -> RunSummary:
    """A run folder or a head checkpoint: its settings (with the head as built and the
    backbone) and its best validation metrics."""
    head = resolve_head(path)
    ckpt = load_checkpoint(head)
    payload = ckpt.payload
    settings = {k: v for k, v in trained_settings(ckpt).items() if k not in _NOT_COMPARED}
    settings.update(
        backbone=ckpt.backbone.name,
        layers=ckpt.backbone.layers,
        size="x".join(str(v) for v in ckpt.preprocessing.size),
    )
    best = payload.get("best") or {}
    metrics = {
        "val mIoU": best.get("val_miou"),
        "val Dice": best.get("val_dice"),
        "val pixel acc": best.get("val_pixel_acc"),
        "val loss": best.get("val_loss"),
        "best epoch": best.get("epoch"),
    }
    per_class = (payload.get("val_metrics") or {}).get("per_class", {})
    name = head.parent.name if head.name == HEAD_FILE else head.stem
    return RunSummary(name, head, settings, metrics, {k: v["iou"] for k, v in per_class.items()})


def run_labels(runs: list[RunSummary]) -> list[str]:
    """A distinct label per run: the shortest tail of its path that no other run's path ends
    with (`sweep1/best` and `sweep2/best`, not `best` twice; `h1` for `heads/h1.pth`)."""
    parts = [
        (r.path.parent if r.path.name == HEAD_FILE else r.path.with_suffix("")).parts for r in runs
    ]
    labels = []
    for i, mine in enumerate(parts):
        others = [p for j, p in enumerate(parts) if j != i]
        k = 1
        while k < len(mine) and any(p[-k:] == mine[-k:] for p in others):
            k += 1
        labels.append("/".join(mine[-k:]))
    return labels


def differing_settings(runs: list[RunSummary]) -> list[str]:
    keys = list(dict.fromkeys(k for r in runs for k in r.settings))
    return [k for k in keys if len({repr(r.settings.get(k)) for r in runs}) > 1]


def _cell(value: Any, metric: bool = False) -> str:
    """A table cell: '-' where a run has no such value (a linear head's width, a run without
    validation), metrics to 4 decimals, settings as `info` shows them."""
    if value is None:
        return "-"
    if metric and isinstance(value, float):
        return f"{value:.4f}"
    return setting_text(value)


def comparison_table(runs: list[RunSummary], markdown: bool = False) -> str:
    """Settings that differ, then the metrics and per-class IoU, one column per run."""
    if len(runs) < 2:
        raise OffroadSegError("compare needs at least two runs")
    names = run_labels(runs)
    sections: list[tuple[str, list[tuple[str, list[str]]]]] = []
    diff = differing_settings(runs)
    sections.append(
        ("settings that differ", [(k, [_cell(r.settings.get(k)) for r in runs]) for k in diff])
    )
    sections.append(
        (
            "validation (best epoch)",
            [(k, [_cell(r.metrics[k], True) for r in runs]) for k in runs[0].metrics],
        )
    )
    classes = list(dict.fromkeys(c for r in runs for c in r.class_iou))
    sections.append(
        ("IoU per class", [(c, [_cell(r.class_iou.get(c), True) for r in runs]) for c in classes])
    )
    if markdown:
        lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for title, rows in sections:
            lines.append(f"| **{title}** |" + " |" * len(names))
            if not rows:
                lines.append("| (none) |" + " |" * len(names))
            lines += [f"| {k} | " + " | ".join(vals) + " |" for k, vals in rows]
        return "\n".join(lines)
    width = max([len(k) for _, rows in sections for k, _ in rows] + [20])
    cols = [max(len(n), 8) for n in names]
    for _, rows in sections:
        for _, vals in rows:
            cols = [max(c, len(v)) for c, v in zip(cols, vals, strict=True)]
    lines = [" " * width + "  " + "  ".join(n.rjust(c) for n, c in zip(names, cols, strict=True))]
    for title, rows in sections:
        lines.append(title)
        if not rows:
            lines.append("  (none)")
        for key, vals in rows:
            cells = "  ".join(v.rjust(c) for v, c in zip(vals, cols, strict=True))
            lines.append(f"{key:<{width}}  {cells}")
    return "\n".join(lines)
