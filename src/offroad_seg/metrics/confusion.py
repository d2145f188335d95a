"""Segmentation metrics from one confusion matrix accumulated over a whole split.

Averaging per-batch IoUs (as the seed did) weights small batches and rare classes wrongly and
changes with the batch size; a single confusion matrix gives the split's true IoU regardless of
how it was batched.

Definitions (rows = ground truth, columns = prediction, ignore pixels excluded):
    TP_c = M[c, c], FP_c = sum_r M[r, c] - TP_c, FN_c = sum_k M[c, k] - TP_c
    IoU_c = TP_c / (TP_c + FP_c + FN_c),  Dice_c = 2 TP_c / (2 TP_c + FP_c + FN_c)
    a class counts in mIoU / mean Dice when it occurs in ground truth or prediction
    pixel accuracy = sum_c TP_c / all pixels
    class accuracy_c = TP_c / (TP_c + FN_c), mean over classes present in ground truth

The hackathon's starter evaluation (per-batch averages, 10 classes, the working size) is kept
apart in metrics.hackathon, only to compare with numbers published on this dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from offroad_seg.data.classes import IGNORE_ID


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_ID
) -> torch.Tensor:
    """(K, K) int64 counts [truth, prediction] over the non-ignored pixels, on pred's device."""
    k2 = num_classes * num_classes
    # the narrowest index type that holds k^2 + 1 bins keeps this memory-light (it runs on
    # every full-size pixel); ignored pixels go to an extra bin that is dropped
    dtype = torch.int16 if k2 < 2**15 else torch.int64
    target = target.to(pred.device)
    idx = target.to(dtype) * num_classes + pred.to(dtype)
    idx.masked_fill_(target == ignore_index, k2)
    counts = torch.bincount(idx.reshape(-1), minlength=k2 + 1)[:k2]
    return counts.view(num_classes, num_classes)


class ConfusionAccumulator:
    """Accumulates a confusion matrix and a pixel-weighted loss on the device (no host syncs)."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_weight = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.matrix += confusion_matrix(pred, target, self.num_classes)

    def add_loss(self, loss_sum: torch.Tensor, weight: torch.Tensor | float) -> None:
        """Add a summed loss and the total weight of its pixels (their pixel count when
        unweighted), so the mean is over pixels, not batches."""
        self.loss_sum += loss_sum.detach().double()
        self.loss_weight += weight

    def compute(self, names: list[str] | None = None) -> SegMetrics:
        weight = float(self.loss_weight)
        loss = float(self.loss_sum) / weight if weight > 0 else None
        return SegMetrics.from_confusion(self.matrix.cpu().numpy(), names, loss)


def clean(x: float | None) -> float | None:
    """A metric for JSON: NaN (nothing to score) becomes None."""
    return None if x is None or math.isnan(x) else float(x)


@dataclass(frozen=True)
class SegMetrics:
    confusion: np.ndarray
    names: list[str]
    loss: float | None = None

    @classmethod
    def from_confusion(
        cls, cm: np.ndarray, names: list[str] | None = None, loss: float | None = None
    ) -> SegMetrics:
        cm = np.asarray(cm, dtype=np.int64)
        names = list(names) if names is not None else [str(i) for i in range(len(cm))]
        return cls(cm, names, loss)

    @property
    def tp(self) -> np.ndarray:
        return np.diag(self.confusion).astype(np.float64)

    @property
    def truth_pixels(self) -> np.ndarray:
        return self.confusion.sum(axis=1).astype(np.float64)

    @property
    def pred_pixels(self) -> np.ndarray:
        return self.confusion.sum(axis=0).astype(np.float64)

    @property
    def present(self) -> np.ndarray:
        """Classes that occur in ground truth or prediction."""
        return (self.truth_pixels + self.pred_pixels) > 0

    @property
    def iou(self) -> np.ndarray:
        union = self.truth_pixels + self.pred_pixels - self.tp
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.present, self.tp / union, np.nan)

    @property
    def dice(self) -> np.ndarray:
        denom = self.truth_pixels + self.pred_pixels
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.present, 2 * self.tp / denom, np.nan)

    @property
    def class_accuracy(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.truth_pixels > 0, self.tp / self.truth_pixels, np.nan)

    @staticmethod
    def _mean(values: np.ndarray) -> float:
        values = values[~np.isnan(values)]
        return float(values.mean()) if values.size else float("nan")

    @property
    def miou(self) -> float:
        return self._mean(self.iou)

    @property
    def mean_dice(self) -> float:
        return self._mean(self.dice)

    @property
    def pixel_accuracy(self) -> float:
        total = self.confusion.sum()
        return float(self.tp.sum() / total) if total else float("nan")

    @property
    def mean_class_accuracy(self) -> float:
        return self._mean(self.class_accuracy)

    def summary(self) -> dict[str, float | None]:
        return {
            "miou": self.miou,
            "mean_dice": self.mean_dice,
            "pixel_accuracy": self.pixel_accuracy,
            "mean_class_accuracy": self.mean_class_accuracy,
            "loss": self.loss,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SegMetrics:
        """The inverse of `to_dict` (everything derives from the matrix and the loss)."""
        return cls.from_confusion(d["confusion_matrix"], d["class_names"], d.get("loss"))

    def to_dict(self) -> dict:
        """JSON-ready: NaN (class absent) becomes null."""
        return {
            **{k: clean(v) if v is not None else None for k, v in self.summary().items()},
            "per_class": {
                name: {
                    "iou": clean(self.iou[i]),
                    "dice": clean(self.dice[i]),
                    "accuracy": clean(self.class_accuracy[i]),
                    "truth_pixels": int(self.truth_pixels[i]),
                    "pred_pixels": int(self.pred_pixels[i]),
                }
                for i, name in enumerate(self.names)
            },
            "confusion_matrix": self.confusion.tolist(),
            "class_names": self.names,
        }

    def image_summary(self) -> dict:
        """One image's numbers as the report's image table shows them (mIoU, pixel accuracy,
        IoU per class; null where a class is absent from truth and prediction), JSON-ready:
        evaluate's metrics.json lists them per image."""
        return {
            "miou": clean(self.miou),
            "pixel_accuracy": clean(self.pixel_accuracy),
            "iou": {name: clean(self.iou[i]) for i, name in enumerate(self.names)},
        }

    def table(self, title: str = "Evaluation") -> str:
        """Human-readable table, as printed and written to evaluation_metrics.txt."""

        def fmt(x: float) -> str:
            return "   n/a" if x is None or math.isnan(x) else f"{x:6.4f}"

        width = max(len("Mean class acc."), *(len(n) for n in self.names))
        lines = [
            title,
            "=" * (width + 40),
            f"{'Mean IoU':<{width}}  {fmt(self.miou)}",
            f"{'Mean Dice':<{width}}  {fmt(self.mean_dice)}",
            f"{'Pixel accuracy':<{width}}  {fmt(self.pixel_accuracy)}",
            f"{'Mean class acc.':<{width}}  {fmt(self.mean_class_accuracy)}",
        ]
        if self.loss is not None:
            lines.append(f"{'Loss':<{width}}  {self.loss:6.4f}")
        lines += [
            "",
            f"{'Class':<{width}}  {'IoU':>6}  {'Dice':>6}  {'Acc':>6}  {'GT pixels':>12}",
            "-" * (width + 40),
        ]
        for i, name in enumerate(self.names):
            lines.append(
                f"{name:<{width}}  {fmt(self.iou[i])}  {fmt(self.dice[i])}  "
                f"{fmt(self.class_accuracy[i])}  {int(self.truth_pixels[i]):>12}"
            )
        return "\n".join(lines)
