"""Figures for training and evaluation.

Two kinds of output:

* matplotlib figures (training curves, per-class metrics, confusion matrix). They are drawn on a
  bare `matplotlib.figure.Figure` (Agg canvas, no pyplot, no global state), so they are safe in
  headless runs and threads; matplotlib is imported only when one of them is drawn.
* `save_png`, which writes the image panels of `reporting.overlays`.

Every file is written atomically: to a hidden temporary file in the destination folder, then
`os.replace`d into place, so a reader never sees a half-written PNG. The destination folder is
created if needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from offroad_seg.core.atomic import atomic_write, write_png_atomic

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "plot_confusion_matrix",
    "plot_per_class_metrics",
    "plot_training_curves",
    "save_png",
]

_DPI = 110
# Above this many classes the confusion-matrix cells are not annotated (unreadable anyway).
_MAX_ANNOTATED_CLASSES = 30


def save_png(path: Path, rgb: np.ndarray) -> None:
    """Save an (H, W, 3) uint8 RGB array (or an (H, W) uint8 grey one) as a PNG, atomically.

    Written to a hidden temporary file in the same folder, then `os.replace`d onto `path`; the
    folder is created if missing (`write_png_atomic`).
    """
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(
            f"save_png: expected (H, W, 3) or (H, W) uint8, got {arr.shape} {arr.dtype}"
        )
    write_png_atomic(path, Image.fromarray(np.ascontiguousarray(arr)))


def _save_figure(fig: Figure, path: Path) -> None:
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=_DPI))
    fig.clear()


def _new_figure(width: float, height: float) -> Figure:
    # Imported here so that the image-panel functions do not pay for matplotlib.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


# --------------------------------------------------------------------------- training curves


def _series(
    history: Sequence[dict[str, float | None]], key: str
) -> tuple[list[float], list[float]]:
    """(epochs, values) of the rows where `key` holds a finite number."""
    xs: list[float] = []
    ys: list[float] = []
    for i, row in enumerate(history):
        value = row.get(key)
        if value is None:
            continue
        value = float(value)
        if not math.isfinite(value):
            continue
        epoch = row.get("epoch")
        xs.append(float(epoch) if epoch is not None else float(i + 1))
        ys.append(value)
    return xs, ys


def _empty_panel(ax: Axes, title: str, message: str) -> None:
    ax.set_title(title)
    ax.text(
        0.5,
        0.5,
        message,
        ha="center",
        va="center",
        transform=ax.transAxes,
        color="0.4",
        fontsize=12,
    )
    ax.set_xticks([])
    ax.set_yticks([])


def plot_training_curves(
    history: list[dict[str, float | None]], path: Path, title: str | None = None
) -> None:
    """Write `training_curves_figure(history, title)` as a PNG at `path`."""
    _save_figure(training_curves_figure(history, title), path)


def training_curves_figure(
    history: list[dict[str, float | None]], title: str | None = None
) -> Figure:
    """A 2x2 figure of the training history: loss, val mIoU, val mean Dice, val pixel accuracy.

    Each row of `history` is one epoch: `epoch` (a row without it is numbered by position,
    from 1) and any of `train_loss`, `val_loss`, `val_miou`, `val_dice`, `val_pixel_acc`. A key
    that is missing, None or not finite is skipped for that row, so validation every N epochs
    plots as a line through the validated epochs. The loss panel shows train and val loss; each
    metric panel marks and names its best epoch, or says 'no validation' when it has no values.
    An empty history gives a figure of four 'no data'/'no validation' panels. `title`, when
    given, names the run above the panels.
    """
    from matplotlib.ticker import MaxNLocator

    fig = _new_figure(10.0, 7.0)
    axes = fig.subplots(2, 2)

    ax = axes[0, 0]
    drawn = False
    for key, label, color in (
        ("train_loss", "train", "tab:blue"),
        ("val_loss", "val", "tab:orange"),
    ):
        xs, ys = _series(history, key)
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, color=color, label=label)
            drawn = True
    if drawn:
        ax.set_title("Loss")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.legend(loc="upper right")
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        _empty_panel(ax, "Loss", "no data")

    for ax, key, panel in (
        (axes[0, 1], "val_miou", "Validation mIoU"),
        (axes[1, 0], "val_dice", "Validation mean Dice"),
        (axes[1, 1], "val_pixel_acc", "Validation pixel accuracy"),
    ):
        xs, ys = _series(history, key)
        if not xs:
            _empty_panel(ax, panel, "no validation")
            continue
        best = int(np.argmax(ys))
        ax.plot(xs, ys, marker="o", markersize=3, color="tab:green")
        ax.plot([xs[best]], [ys[best]], marker="*", markersize=12, color="tab:red", ls="none")
        ax.set_title(f"{panel} (best {ys[best]:.4f} @ epoch {xs[best]:g})")
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    if title:
        fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------- per-class metrics


def _nan_mean(values: np.ndarray) -> float | None:
    """Mean over the finite entries; None when there are none (no empty-slice warning)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _fmt_mean(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def plot_per_class_metrics(
    names: list[str],
    iou: np.ndarray,
    dice: np.ndarray,
    path: Path,
    title: str = "Per-class metrics",
) -> None:
    """Write a PNG of grouped horizontal bars, IoU and Dice per class, values written at the bars.

    `iou` and `dice` are (K,) arrays matching `names` (fractions in 0..1; larger values widen
    the axis). NaN marks a class that is absent from both truth and prediction: no bar, 'n/a'
    written instead. The legend and title give the mean over the non-NaN classes.
    """
    iou = np.asarray(iou, dtype=np.float64).reshape(-1)
    dice = np.asarray(dice, dtype=np.float64).reshape(-1)
    k = len(names)
    if k == 0:
        raise ValueError("plot_per_class_metrics: no classes")
    if iou.shape != (k,) or dice.shape != (k,):
        raise ValueError(
            f"plot_per_class_metrics: {k} names but iou {iou.shape} and dice {dice.shape}"
        )
    mean_iou, mean_dice = _nan_mean(iou), _nan_mean(dice)

    fig = _new_figure(8.0, max(3.0, 0.5 * k + 1.5))
    ax = fig.add_subplot()
    y = np.arange(k, dtype=np.float64)
    h = 0.38
    finite_max = max([1.0] + [float(v) for v in np.concatenate([iou, dice]) if math.isfinite(v)])
    xmax = finite_max * 1.16
    for values, offset, label, color in (
        (iou, -h / 2, f"IoU (mean {_fmt_mean(mean_iou)})", "tab:blue"),
        (dice, h / 2, f"Dice (mean {_fmt_mean(mean_dice)})", "tab:orange"),
    ):
        ok = np.isfinite(values)
        ax.barh(y[ok] + offset, values[ok], height=h, color=color, label=label)
        for yi, v in zip(y + offset, values, strict=True):
            text = f"{v:.3f}" if math.isfinite(v) else "n/a"
            x = v if math.isfinite(v) else 0.0
            ax.text(
                x + 0.01 * finite_max,
                yi,
                text,
                va="center",
                ha="left",
                fontsize=8,
                color="0.15" if math.isfinite(v) else "0.5",
            )
    ax.set_yticks(y, names)
    ax.set_ylim(k - 0.5, -0.5)  # first class at the top
    ax.set_xlim(0.0, xmax)
    ax.set_xlabel("score")
    ax.grid(True, axis="x", alpha=0.3)
    # Below the axes, so it never hides a bar or its value.
    fig.legend(loc="outside lower center", ncol=2, fontsize=9, frameon=False)
    ax.set_title(f"{title}\nmean IoU {_fmt_mean(mean_iou)} · mean Dice {_fmt_mean(mean_dice)}")
    _save_figure(fig, path)


# --------------------------------------------------------------------------- confusion matrix


def _fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def _fmt_fraction(v: float) -> str:
    return f"{v:.2f}" if v >= 0.005 else "<.01"


def plot_confusion_matrix(
    cm: np.ndarray, names: list[str], path: Path, normalize: bool = True
) -> None:
    """Write a PNG of a (K, K) confusion matrix: rows = ground truth, columns = prediction.

    With `normalize` (the default) each row is divided by its pixel count: the colour and the
    cell text are the fraction of that class's pixels predicted as each class (0..1). Without
    it, colour and text are raw counts (written compactly, e.g. 1.2M). Zero cells are left blank,
    tiny non-zero fractions show as '<.01'. A row with no pixels stays zero (no division) and
    its label reads '(no pixels)'; the other labels give the row's pixel count. Cells are not
    annotated above 30 classes.
    """
    cm = np.asarray(cm, dtype=np.float64)
    k = len(names)
    if k == 0:
        raise ValueError("plot_confusion_matrix: no classes")
    if cm.shape != (k, k):
        raise ValueError(f"plot_confusion_matrix: {k} names but a {cm.shape} matrix")
    rows = cm.sum(axis=1)
    if normalize:
        values = np.zeros_like(cm)
        np.divide(cm, rows[:, None], out=values, where=rows[:, None] > 0)
        vmax = 1.0
    else:
        values = cm
        vmax = float(cm.max()) if cm.size and cm.max() > 0 else 1.0

    side = max(5.0, 0.62 * k + 3.0)
    fig = _new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    im = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of row" if normalize else "pixels")
    row_labels = [
        f"{name} ({_fmt_count(n)})" if n > 0 else f"{name} (no pixels)"
        for name, n in zip(names, rows, strict=True)
    ]
    ax.set_xticks(np.arange(k), names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(np.arange(k), row_labels)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title("Confusion matrix" + (" (row-normalised)" if normalize else " (pixels)"))

    if k <= _MAX_ANNOTATED_CLASSES:
        fontsize = max(5.0, min(9.0, 110.0 / max(k, 1)))
        for i in range(k):
            for j in range(k):
                if cm[i, j] == 0:
                    continue
                v = values[i, j]
                text = _fmt_fraction(v) if normalize else _fmt_count(v)
                color = "white" if v > 0.55 * vmax else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color=color)
    _save_figure(fig, path)


# --------------------------------------------------------------------------- sweeps


LABEL_WIDTH = 32  # characters per line of a sweep plot's trial label


def plot_sweep(
    rows: list[dict],
    curves: dict[str, list[tuple[int, float | None]]],
    path: Path,
    title: str | None = None,
    labels: list[str] | None = None,
) -> None:
    """Write a PNG of a sweep: on the left every trial's best validation mIoU, best first
    (pruned trials grey), on the right the validation mIoU per epoch of the best trials.

    `rows` are leaderboard rows (`run`, `state`, `val_miou`), `labels` their names on the
    plot (default: `run`), wrapped onto lines rather than cut; `curves` maps a label to its
    (epoch, val mIoU) points."""
    import textwrap

    def wrap(text: str) -> str:
        return "\n".join(textwrap.wrap(text, LABEL_WIDTH, break_on_hyphens=False)[:3])

    labels = [wrap(label) for label in (labels or [r["run"] for r in rows])]
    lines = sum(label.count("\n") + 1 for label in labels)
    fig = _new_figure(12.0, max(3.5, 0.18 * lines + 0.1 * len(rows) + 1.5))
    left, right = fig.subplots(1, 2, width_ratios=(1.1, 1.0))
    values = [float(r["val_miou"]) for r in rows]
    colors = ["tab:green" if r["state"] == "complete" else "tab:gray" for r in rows]
    y = np.arange(len(rows))
    left.barh(y, values, color=colors)
    left.set_yticks(y, labels, fontsize=7)
    left.invert_yaxis()
    left.set_xlabel("best validation mIoU")
    left.set_title("Trials (grey: pruned)")
    for yi, v in zip(y, values, strict=True):
        left.text(v, yi, f" {v:.4f}", va="center", fontsize=7)
    left.set_xlim(0, max([1e-6, *values]) * 1.18)
    left.grid(True, axis="x", alpha=0.3)
    for run, points in curves.items():
        xs = [e for e, v in points if v is not None]
        ys = [v for _, v in points if v is not None]
        right.plot(xs, ys, marker="o", markersize=3, label=wrap(run))
    from matplotlib.ticker import MaxNLocator

    right.set_title(f"Validation mIoU of the best {len(curves)}")
    right.set_xlabel("epoch")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.grid(True, alpha=0.3)
    if curves:
        # beside the axes (constrained layout makes room): over them it hid the curves
        right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    if title:
        fig.suptitle(title)
    _save_figure(fig, path)


def plot_class_iou_comparison(
    runs: dict[str, dict[str, float | None]], path: Path, title: str | None = None
) -> None:
    """Write a PNG of grouped horizontal bars: each class's IoU in each run (None: absent)."""
    classes = list(dict.fromkeys(c for ious in runs.values() for c in ious))
    fig = _new_figure(9.0, max(3.0, 0.22 * len(classes) * max(2, len(runs)) + 1.5))
    ax = fig.add_subplot()
    height = 0.8 / max(1, len(runs))
    y = np.arange(len(classes), dtype=np.float64)
    for i, (name, ious) in enumerate(runs.items()):
        values = [np.nan if ious.get(c) is None else float(ious[c]) for c in classes]
        ax.barh(y + (i - (len(runs) - 1) / 2) * height, values, height=height, label=name)
    ax.set_yticks(y, classes)
    ax.invert_yaxis()
    ax.set_xlabel("IoU")
    ax.set_xlim(0, 1)
    ax.grid(True, axis="x", alpha=0.3)
    # beside the axes, so it never hides a bar
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    if title:
        ax.set_title(title)
    _save_figure(fig, path)
