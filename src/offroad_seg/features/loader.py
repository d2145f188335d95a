"""Decoding in DataLoader workers, shared by extract, evaluate and predict.

Workers decode PNGs and resize them (`resize_image`, uint8) to the working size; the main
process moves the small uint8 batch to the device (pinned, non-blocking on CUDA), where
`Backbone.encode` normalises it. Errors in a worker come back as one-line messages instead of
exceptions, because DataLoader re-raises worker exceptions with a multi-line traceback inside
the message.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from offroad_seg.data.classes import ClassMap
from offroad_seg.data.dataset import Sample
from offroad_seg.data.images import open_header, read_image, read_mask
from offroad_seg.errors import DataError, OffroadSegError
from offroad_seg.metrics.hackathon import hackathon_truth
from offroad_seg.models.preprocess import (
    Preprocessing,
    image_to_tensor,
    resize_image,
    resize_labels,
)
from offroad_seg.reporting.thumbnails import preview

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeOptions:
    """What each worker produces for a sample."""

    prep: Preprocessing
    class_map: ClassMap | None = None  # None: images only (predict)
    ignore_unknown_codes: bool = False
    labels: str = "working"  # "working": ids at the working size; "original": full size
    keep_original: bool = False  # also return the uint8 image (for panels and overlays)
    # ... only for samples whose index is below (None: all): originals are 1.5 MB at 960x540,
    # and the loader's prefetch multiplies whatever a sample carries
    original_limit: int | None = None
    extra_sizes: tuple[tuple[int, int], ...] = ()  # also resized to these (multi-scale TTA)
    preview_height: int = 0  # also a small copy of the image this tall (report thumbnails)
    # also the hackathon protocol's truth at this size (metrics.hackathon_truth): None, none
    hackathon: tuple[int, int] | None = None


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

    def keeps_original(self, index: int) -> bool:
        limit = self.opts.original_limit
        return self.opts.keep_original and (limit is None or index < limit)

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
        if self.keeps_original(index):
            out["original"] = rgb
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
                truth = hackathon_truth(codes, opts.hackathon, str(sample.mask))
                out["hackathon"] = truth.astype(np.uint8)  # ids 0..9
            if ids.shape != rgb.shape[:2]:
                raise DataError(
                    f"{sample.mask}: mask is {ids.shape[1]}x{ids.shape[0]} but its image is "
                    f"{rgb.shape[1]}x{rgb.shape[0]}"
                )
            out["labels"] = resize_labels(ids, opts.prep.size) if opts.labels == "working" else ids
        return out


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack what stacks (same-size images); keep lists otherwise (None where a sample has no
    such value, e.g. an original image past `original_limit`). The first error wins."""
    for item in items:
        if item["error"] is not None:
            return {"error": item["error"], "index": [it["index"] for it in items]}
    batch: dict[str, Any] = {"error": None, "index": [it["index"] for it in items]}
    for key in dict.fromkeys(k for it in items for k in it):
        if key in ("error", "index"):
            continue
        values = [it.get(key) for it in items]
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


# Host memory the loader may fill with decoded samples ahead of the model: workers x prefetch
# x batch samples. The GPU needs a batch or two ready, not the 16 x 4 x 64 = 4096 images
# (up to ~10 GB with full-size masks and originals) that the CUDA defaults would otherwise hold.
HOST_BYTES_IN_FLIGHT = 1 << 30
MAX_PREFETCH = 4


def sample_bytes(opts: DecodeOptions, image_size: tuple[int, int]) -> int:
    """Host bytes of one decoded sample from an image of (height, width) `image_size`:
    the resized image (at every TTA size), labels at the working or the original size, the
    hackathon labels and the preview when asked for, and the original image when every sample
    keeps it (with `original_limit`, only the first few do)."""
    rows, cols = opts.prep.size
    height, width = image_size
    total = 3 * rows * cols + sum(3 * r * c for r, c in opts.extra_sizes)
    if opts.class_map is not None:
        total += rows * cols if opts.labels == "working" else height * width
        total += rows * cols if opts.hackathon else 0
    if opts.preview_height:
        total += 3 * opts.preview_height * round(width * opts.preview_height / height)
    if opts.keep_original and opts.original_limit is None:
        total += 3 * height * width
    return total


def loader_shape(
    workers: int, batch_size: int, per_sample: int, budget: int = HOST_BYTES_IN_FLIGHT
) -> tuple[int, int | None]:
    """(workers, prefetch factor) that keep workers x prefetch x batch decoded samples within
    `budget` bytes: fewer batches prefetched first, then fewer workers (at least one
    prefetched batch per worker and one worker). No workers: nothing is prefetched."""
    if workers <= 0:
        return 0, None
    per_batch = max(1, batch_size * per_sample)
    workers = max(1, min(workers, budget // per_batch))
    return workers, max(1, min(MAX_PREFETCH, budget // (workers * per_batch)))


def _first_image_size(dataset: DecodedSamples) -> tuple[int, int]:
    """(height, width) of the first image from its header; the working size if unreadable
    (decoding will report the file)."""
    try:
        with open_header(dataset.samples[0].image) as img:  # reads the header only
            width, height = img.size
    except Exception:
        return tuple(dataset.opts.prep.size)
    return height, width


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process (SIGKILL) when its parent dies, on Linux (elsewhere a
    no-op). A DataLoader worker otherwise outlives a `kill -9` of the main process: its queue's
    feeder thread blocks on a full pipe whose other end it holds itself, and it stays alive,
    holding its memory, reparented to init. `parent`: the pid that started this process; if it
    already died before the call, this process exits now."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl here: the worker's own watchdog remains
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _worker_init(parent: int, worker_id: int) -> None:
    die_with_parent(parent)


def make_loader(
    dataset: DecodedSamples,
    batches: Sequence[Sequence[int]] | int,
    workers: int,
    device: torch.device,
) -> DataLoader:
    """Batches are explicit lists of sample indices, or a batch size over all samples.
    Decoded samples held ahead of the model stay within `HOST_BYTES_IN_FLIGHT` (see
    `loader_shape`; sized from the first image)."""
    if isinstance(batches, int):
        n, size = len(dataset), batches
        batches = [list(range(s, min(s + size, n))) for s in range(0, n, size)]
    prefetch = None
    if workers > 0 and len(dataset):
        per_sample = sample_bytes(dataset.opts, _first_image_size(dataset))
        largest = max((len(b) for b in batches), default=1)
        wanted = workers
        workers, prefetch = loader_shape(workers, largest, per_sample)
        if workers < wanted:
            log.info("decoding with %d workers (of %d) to bound host memory", workers, wanted)
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=prefetch,
        worker_init_fn=functools.partial(_worker_init, os.getpid()) if workers > 0 else None,
    )
