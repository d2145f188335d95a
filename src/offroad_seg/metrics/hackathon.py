"""The hackathon's starter evaluation, reproduced exactly so that our heads can be compared with
numbers published on this dataset. It is NOT our metric (see metrics.confusion): it scores
10 classes (Flowers and unknown codes are Background) at the working size, against masks
resized bilinearly (boundary pixels get in-between ids), per batch of 2 images in sorted
file-name order, and averages the batches. Evaluation stores per-image counts (any batch size,
order or process; resumable) and `hackathon_scores` forms the batches at the end.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from offroad_seg.data.classes import ClassMap

HACKATHON_TITLE = "hackathon protocol (for comparison only)"
HACKATHON_BATCH_SIZE = 2
# The starter's working size (rows, cols). The protocol scores every model there, whatever its
# own working size (DINOv3's 272x480, a larger DINOv2 size): the truth is resized to it and the
# logits upsampled to it, so numbers stay comparable with those published on this dataset.
HACKATHON_SIZE = (266, 476)
HACKATHON_DICE_SMOOTH = 1e-6


def hackathon_truth(codes: np.ndarray, size: tuple[int, int], source: str = "mask") -> np.ndarray:
    """A mask of raw codes at its original size -> (rows, cols) int64 hackathon ids, as the
    starter's `Resize((rows, cols))` + `ToTensor()` on the PIL id image, then `* 255` and
    `.long()`: PIL's antialiased bilinear resize of the uint8 ids, rounded to uint8. (The
    float32 /255, *255 round trip and truncation return every uint8 value unchanged, so the
    resized ids are used as they are; tests check all 256.)"""
    if codes.ndim != 2:
        raise ValueError(f"{source}: expected a (H, W) mask, got shape {codes.shape}")
    ids = ClassMap.hackathon().codes_to_ids(codes, source=source)
    rows, cols = size
    img = Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint8))
    if img.size != (cols, rows):  # torchvision returns an image of the asked size untouched
        img = img.resize((cols, rows), Image.Resampling.BILINEAR)
    return np.asarray(img).astype(np.int64)


def _hackathon_id_table(model_class_map: ClassMap) -> np.ndarray:
    """(256,) int64: a model's class id -> its raw code -> hackathon id (ids past the model's
    classes, e.g. ignore, are Background, as `ids_to_codes` maps them to code 0)."""
    table = np.zeros(256, dtype=np.int64)
    table[: model_class_map.num_classes] = ClassMap.hackathon().codes_to_ids(model_class_map.codes)
    return table


def to_hackathon_ids(
    pred_ids: torch.Tensor | np.ndarray, model_class_map: ClassMap
) -> torch.Tensor | np.ndarray:
    """Predicted ids of a model trained on `model_class_map` -> int64 hackathon ids (same type
    and device as the input), through the raw codes: Flowers and other unknown codes are 0."""
    table = _hackathon_id_table(model_class_map)
    if isinstance(pred_ids, torch.Tensor):
        return torch.from_numpy(table).to(pred_ids.device)[pred_ids.long()]
    return table[np.asarray(pred_ids).astype(np.int64, copy=False)]


def hackathon_prediction(
    logits: torch.Tensor | Sequence[torch.Tensor], size: tuple[int, int], model_class_map: ClassMap
) -> torch.Tensor:
    """(B, K, h, w) token-grid logits -> (B, rows, cols) int64 hackathon ids: the argmax of the
    logits upsampled as the starter did (F.interpolate, bilinear, align_corners=False). A list
    (test-time augmentation's passes) is averaged after upsampling."""
    parts = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    up = sum(
        F.interpolate(part.float(), size=size, mode="bilinear", align_corners=False)
        for part in parts
    )
    # max's indices are argmax's (the first maximum), ~4x faster over dim 1 on CPU
    return to_hackathon_ids(up.max(1).indices, model_class_map)


def hackathon_image_counts(
    pred_h: torch.Tensor | np.ndarray, truth_h: torch.Tensor | np.ndarray, num_classes: int = 10
) -> np.ndarray:
    """One image's counts, all the batch rules need: a (3K + 2,) int64 array holding, per class,
    |pred ∩ truth| (K values), then |pred| (K), then |truth| (K), then correct pixels and all
    pixels. Counts of several images add up to the counts of their batch."""
    k = num_classes
    if tuple(pred_h.shape) != tuple(truth_h.shape):
        raise ValueError(f"prediction {tuple(pred_h.shape)} and truth {tuple(truth_h.shape)}")
    if isinstance(pred_h, torch.Tensor) or isinstance(truth_h, torch.Tensor):
        device = pred_h.device if isinstance(pred_h, torch.Tensor) else truth_h.device
        pred = torch.as_tensor(pred_h, device=device).long().reshape(-1)
        truth = torch.as_tensor(truth_h, device=device).long().reshape(-1)
        bad = ((pred < 0) | (pred >= k) | (truth < 0) | (truth >= k)).any()
        idx = truth.clamp(0, k - 1) * k + pred.clamp(0, k - 1)
        joint = torch.bincount(idx, minlength=k * k).view(k, k)
        diag = joint.diagonal()
        total = torch.tensor([pred.numel()], device=device)
        row = torch.cat([diag, joint.sum(0), joint.sum(1), diag.sum()[None], total, bad[None]])
        row = row.cpu().numpy()  # one transfer (and sync) per image, the range check included
        out, out_of_range = row[:-1], bool(row[-1])
    else:
        pred = np.asarray(pred_h).astype(np.int64, copy=False).reshape(-1)
        truth = np.asarray(truth_h).astype(np.int64, copy=False).reshape(-1)
        out_of_range = pred.size > 0 and (
            min(pred.min(), truth.min()) < 0 or max(pred.max(), truth.max()) >= k
        )
        if not out_of_range:
            joint = np.bincount(truth * k + pred, minlength=k * k).reshape(k, k)
            diag = np.diagonal(joint)
            out = np.concatenate([diag, joint.sum(0), joint.sum(1), [diag.sum(), pred.size]])
    if out_of_range:
        raise ValueError(f"hackathon ids outside 0..{k - 1}")
    return out.astype(np.int64)


@dataclass(frozen=True)
class HackathonMetrics:
    """The hackathon protocol's scores: means over batches of per-batch values."""

    miou: float
    dice: float
    pixel_accuracy: float
    num_batches: int
    num_images: int
    class_iou: tuple[float, ...]  # per class, the mean over batches where it occurs (NaN: never)
    class_names: tuple[str, ...]
    batch_size: int = HACKATHON_BATCH_SIZE

    def to_dict(self) -> dict:
        """JSON-ready: NaN (a class in no batch) becomes null."""

        def clean(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        return {
            "protocol": "hackathon",
            "title": HACKATHON_TITLE,
            "miou": clean(self.miou),
            "dice": clean(self.dice),
            "pixel_accuracy": clean(self.pixel_accuracy),
            "num_batches": self.num_batches,
            "num_images": self.num_images,
            "batch_size": self.batch_size,
            "per_class_iou": {
                n: clean(v) for n, v in zip(self.class_names, self.class_iou, strict=True)
            },
        }

    @classmethod
    def from_dict(cls, d: dict) -> HackathonMetrics:
        """The inverse of `to_dict`."""

        def nan(x: float | None) -> float:
            return float("nan") if x is None else float(x)

        per_class = d["per_class_iou"]
        return cls(
            miou=nan(d["miou"]),
            dice=nan(d["dice"]),
            pixel_accuracy=nan(d["pixel_accuracy"]),
            num_batches=int(d["num_batches"]),
            num_images=int(d["num_images"]),
            class_iou=tuple(nan(v) for v in per_class.values()),
            class_names=tuple(per_class),
            batch_size=int(d["batch_size"]),
        )

    def table(self) -> str:
        """Human-readable table, titled as a comparison number (not our metric)."""

        def fmt(x: float) -> str:
            return "   n/a" if math.isnan(x) else f"{x:6.4f}"

        width = max(len("Pixel accuracy"), *(len(n) for n in self.class_names))
        lines = [
            HACKATHON_TITLE,
            "=" * (width + 40),
            f"{'Mean IoU':<{width}}  {fmt(self.miou)}",
            f"{'Mean Dice':<{width}}  {fmt(self.dice)}",
            f"{'Pixel accuracy':<{width}}  {fmt(self.pixel_accuracy)}",
            f"means over {self.num_batches} batches of {self.batch_size} images "
            f"({self.num_images} images, sorted by name)",
            "",
            f"{'Class':<{width}}  {'IoU':>6}  (mean over the batches where it occurs)",
            "-" * (width + 40),
        ]
        lines += [
            f"{name:<{width}}  {fmt(v)}"
            for name, v in zip(self.class_names, self.class_iou, strict=True)
        ]
        return "\n".join(lines)


def _batch_scores(counts: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
    """One batch's summed counts -> (per-class IoU with NaN where the union is empty, mean
    Dice over all K classes, pixel accuracy)."""
    inter, pred, truth = counts[:k], counts[k : 2 * k], counts[2 * k : 3 * k]
    correct, total = counts[3 * k], counts[3 * k + 1]
    union = pred + truth - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
    dice = (2 * inter + HACKATHON_DICE_SMOOTH) / (pred + truth + HACKATHON_DICE_SMOOTH)
    accuracy = correct / total if total else float("nan")
    return iou, float(dice.mean()), float(accuracy)


def hackathon_scores(
    names: Sequence[str],
    counts: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    batch_size: int = HACKATHON_BATCH_SIZE,
    class_names: Sequence[str] | None = None,
) -> HackathonMetrics:
    """Per-image counts (`hackathon_image_counts`, by name or aligned with `names`) -> the
    protocol's scores: images sorted by name, batches of `batch_size` (the last may be
    smaller), per batch IoU (NaN-mean over classes), Dice and pixel accuracy, then plain means
    over batches."""
    names = list(names)
    if not names:
        raise ValueError("hackathon scores: no images")
    if len(set(names)) != len(names):
        raise ValueError("hackathon scores: duplicate image names")
    if isinstance(counts, Mapping):
        missing = [n for n in names if n not in counts]
        if missing:
            raise ValueError(f"hackathon scores: no counts for {', '.join(missing[:5])}")
        rows = [counts[n] for n in names]
    else:
        if len(counts) != len(names):
            raise ValueError(f"hackathon scores: {len(counts)} counts for {len(names)} names")
        rows = list(counts)
    by_name = dict(zip(names, rows, strict=True))
    table = np.stack([np.asarray(by_name[n], dtype=np.int64) for n in sorted(names)])
    k, rest = divmod(table.shape[1] - 2, 3)
    if rest or k < 1:
        raise ValueError(f"hackathon scores: counts of length {table.shape[1]}; expected 3K + 2")
    class_names = tuple(class_names) if class_names is not None else None
    if class_names is None:
        hackathon = ClassMap.hackathon()
        class_names = tuple(hackathon.names) if k == hackathon.num_classes else None
        class_names = class_names or tuple(str(i) for i in range(k))
    if len(class_names) != k:
        raise ValueError(f"hackathon scores: {len(class_names)} class names for {k} classes")

    ious, mious, dices, accuracies = [], [], [], []
    for start in range(0, len(table), batch_size):
        iou, dice, accuracy = _batch_scores(table[start : start + batch_size].sum(0), k)
        ious.append(iou)
        mious.append(float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan"))
        dices.append(dice)
        accuracies.append(accuracy)
    ious = np.stack(ious)
    seen = ~np.isnan(ious)
    with np.errstate(divide="ignore", invalid="ignore"):
        class_iou = np.where(seen.any(0), np.nansum(ious, 0) / seen.sum(0), np.nan)
    return HackathonMetrics(
        miou=float(np.mean(mious)),
        dice=float(np.mean(dices)),
        pixel_accuracy=float(np.mean(accuracies)),
        num_batches=len(mious),
        num_images=len(table),
        class_iou=tuple(float(v) for v in class_iou),
        class_names=class_names,
        batch_size=batch_size,
    )
