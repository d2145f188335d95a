"""Decoding in DataLoader workers, shared by extract, evaluate and predict.

Workers decode PNGs and resize them (`resize_image`, uint8) to the working size; the main
process moves the small uint8 batch to the device (pinned, non-blocking on CUDA), where
`Backbone.encode` normalises it. Errors in a worker come back as one-line messages instead of
exceptions, because DataLoader re-raises worker exceptions with a multi-line traceback inside
the message.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from offroad_seg.data import ClassMap, Sample, read_image, read_mask
from offroad_seg.errors import DataError, OffroadSegError
from offroad_seg.metrics import hackathon_truth
from offroad_seg.preprocess import Preprocessing, image_to_tensor, resize_image, resize_labels
from offroad_seg.report import preview


@dataclass(frozen=True)
class DecodeOptions:
    """What each worker produces for a sample."""

    prep: Preprocessing
    class_map: ClassMap | None = None  # None: images only (predict)
    ignore_unknown_codes: bool = False
    labels: str = "working"  # "working": ids at the working size; "original": full size
    # also return the uint8 image of samples below this index (panels, overlays): originals are
    # 1.5 MB at 960x540, and the loader's prefetch multiplies whatever a sample carries
    keep_original_below: int = 0
    extra_sizes: tuple[tuple[int, int], ...] = ()  # also resized to these (multi-scale TTA)
    preview_height: int = 0  # also a small copy of the image this tall (report thumbnails)
    hackathon: bool = False  # also the hackathon protocol's truth (metrics.hackathon_truth)


class DecodedSamples(Dataset):
    """Decodes sample `i` into tensors; see `DecodeOptions`."""

    def __init__(self, samples: Sequence[Sample], opts: DecodeOptions):
        self.samples = samples
        self.opts = opts

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return {"index": index, "error": None, **self._decode(index, self.samples[index])}
        except OffroadSegError as e:
            return {"index": index, "error": str(e)}
        except Exception as e:  # an unexpected decoder failure still names the file
            return {
                "index": index,
                "error": f"{self.samples[index].image}: {type(e).__name__}: {e}",
            }

    def _decode(self, index: int, sample: Sample) -> dict[str, Any]:
        opts = self.opts
        rgb = read_image(sample.image)
        out: dict[str, Any] = {"size": rgb.shape[:2]}
        image = image_to_tensor(rgb)
        out["image"] = resize_image(image, opts.prep)[0]
        if opts.extra_sizes:  # the same resize to each other scale's size
            out["scaled"] = [
                resize_image(image, replace(opts.prep, size=size))[0] for size in opts.extra_sizes
            ]
        if opts.keep_original_below:  # None past the first N (collate needs every key)
            out["original"] = rgb if index < opts.keep_original_below else None
        if opts.preview_height:
            out["preview"] = preview(rgb, opts.preview_height)
        if opts.class_map is not None:
            if sample.mask is None:
                raise DataError(f"{sample.image}: no mask")
            codes = read_mask(sample.mask)
            ids = opts.class_map.codes_to_ids(
                codes, source=str(sample.mask), ignore_unknown=opts.ignore_unknown_codes
            )
            if opts.hackathon:
                truth = hackathon_truth(codes, opts.prep.size, str(sample.mask))
                out["hackathon"] = truth.astype(np.uint8)  # ids 0..9
            if ids.shape != rgb.shape[:2]:
                raise DataError(
                    f"{sample.mask}: mask is {ids.shape[1]}x{ids.shape[0]} but its image is "
                    f"{rgb.shape[1]}x{rgb.shape[0]}"
                )
            out["labels"] = resize_labels(ids, opts.prep.size) if opts.labels == "working" else ids
        return out


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack what stacks (same-size images); keep lists otherwise. The first error wins."""
    for item in items:
        if item["error"] is not None:
            return {"error": item["error"], "index": [it["index"] for it in items]}
    batch: dict[str, Any] = {"error": None, "index": [it["index"] for it in items]}
    for key in items[0]:
        if key in ("error", "index"):
            continue
        values = [it[key] for it in items]
        if key == "image" and len({tuple(v.shape) for v in values}) == 1:
            batch[key] = torch.stack(values)
        elif key == "scaled":  # one stack per extra size (every image has every size)
            batch[key] = [torch.stack(per_size) for per_size in zip(*values, strict=True)]
        elif key in ("labels", "hackathon") and len({v.shape for v in values}) == 1:
            batch[key] = torch.from_numpy(np.stack(values))
        else:
            batch[key] = values
    return batch


def default_batch_size(device: torch.device) -> int:
    """Images per backbone pass: small on CPU (no gain from more), large on a GPU."""
    return 64 if device.type == "cuda" else 8


def default_workers(device: torch.device) -> int:
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return min(16, cores)
    # On CPU the backbone already uses every core; one worker keeps decoding off its path.
    return 1 if cores <= 4 else min(4, cores // 2)


def make_loader(
    dataset: DecodedSamples,
    batches: Sequence[Sequence[int]] | int,
    workers: int,
    device: torch.device,
) -> DataLoader:
    """Batches are explicit lists of sample indices, or a batch size over all samples."""
    if isinstance(batches, int):
        n, size = len(dataset), batches
        batches = [list(range(s, min(s + size, n))) for s in range(0, n, size)]
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
