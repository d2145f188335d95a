"""Shared set-up for the benchmark scripts: a dataset (synthetic or real) and its caches."""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from offroad_seg.data.synthetic import write_split
from offroad_seg.features.extract import ExtractConfig, extract


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", type=Path, help="a dataset folder (Color_Images/, Segmentation/)")
    p.add_argument("--images", type=int, default=32, help="synthetic images when no --data")
    p.add_argument("--workdir", type=Path, default=Path("runs/bench"), help="scratch folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", default="random")
    p.add_argument("--size", default="266x476")
    return p


def setup(args) -> tuple[Path, torch.device]:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from offroad_seg.core.runtime import resolve_device

    device = resolve_device(args.device)
    if args.data is not None:
        return args.data, device
    data = args.workdir / f"synth{args.images}"
    if not (data / "Segmentation").is_dir():
        write_split(data, args.images, seed=0)
    return data, device


def validation_data(args) -> Path:
    """`--val-data`, or `--val` synthetic scenes of another seed than the training ones."""
    if getattr(args, "val_data", None):
        return Path(args.val_data)
    val = args.workdir / f"synth-val{args.val}-seed1"
    if not (val / "Segmentation").is_dir():
        write_split(val, args.val, seed=1)
    return val


def ensure_cache(data: Path, cache: Path, args, size: tuple[int, int] | None = None, **kw) -> Path:
    """`cache` extracted from `data` unless it exists; at `size`, else `--size`, on `--device`
    unless `kw` names one (`kw`: other ExtractConfig settings)."""
    from offroad_seg.models.preprocess import parse_size

    if not (cache / "zarr.json").exists():
        settings = {"device": args.device, "progress": False, **kw}
        size = size or parse_size(args.size)
        extract(
            ExtractConfig(data_dir=data, cache=cache, weights=args.weights, size=size, **settings)
        )
    return cache


def online_inputs(data: Path, args, device: torch.device):
    """What an online loop (the seed's: the backbone on every image of every epoch) runs on:
    the `--size` preprocessing, the `--weights` backbone and a decoding loader of `data` in
    `--batch-size` batches."""
    from offroad_seg.data.classes import ClassMap
    from offroad_seg.data.dataset import list_samples
    from offroad_seg.features.loader import (
        DecodedSamples,
        DecodeOptions,
        default_workers,
        make_loader,
    )
    from offroad_seg.models.backbone import load_backbone
    from offroad_seg.models.preprocess import Preprocessing, parse_size

    prep = Preprocessing(size=parse_size(args.size))
    backbone = load_backbone(args.weights, device=device)
    opts = DecodeOptions(prep=prep, class_map=ClassMap.default())
    samples = DecodedSamples(list_samples(data), opts)
    return prep, backbone, make_loader(samples, args.batch_size, default_workers(device), device)


def resident(t: torch.Tensor, device: torch.device, fraction: float = 0.25) -> torch.Tensor:
    """`t` on the device when it takes at most `fraction` of the device's free memory, else
    in pinned host memory (batches are then copied as they are used, as the real stages do):
    a whole dataset does not fit the 6 GB cards many users have."""
    if device.type != "cuda":
        return t.to(device)
    free, _ = torch.cuda.mem_get_info(device)
    if t.numel() * t.element_size() <= fraction * free:
        return t.to(device)
    return t.pin_memory()


def random_cache(
    path: Path,
    n: int,
    size: tuple[int, int] = (266, 476),
    seed: int = 0,
    version: int = 2,
    chunks_per_shard: int = 0,
):
    """A finished cache of `n` images of random float16 features and blocky labels (training
    speed and memory do not depend on the values; nor does writing, since random features
    compress like real ones to within ~15%). Written as extract writes: whole units (a chunk,
    or a shard in format 2), committed in groups of about 64 chunks (one fsync pass each)."""
    from offroad_seg.data.classes import ClassMap
    from offroad_seg.features.cache import FeatureCache
    from offroad_seg.features.cache_format import CacheSpec
    from offroad_seg.models.backbone import BackboneSpec
    from offroad_seg.models.preprocess import Preprocessing

    spec = CacheSpec(
        backbone=BackboneSpec(weights_sha256="0" * 64, weights_source="bench"),
        preprocessing=Preprocessing(size=tuple(size)),
        class_map=ClassMap.default(),
        names=tuple(f"{i:07d}.png" for i in range(n)),
        sources_digest="bench",
        version=version,
        chunks_per_shard=chunks_per_shard,
    )
    cache = FeatureCache.create(path, spec, overwrite=True)
    rng = np.random.default_rng(seed)
    (h, w), (rows, cols) = spec.preprocessing.grid, spec.preprocessing.size
    group: list[int] = []
    per_commit = max(1, 64 // cache.chunks_per_unit)
    for unit in range(cache.num_units):
        start, stop = cache.unit_range(unit)
        k = stop - start
        feats = rng.standard_normal((k, 1, cache.channels, h, w), dtype=np.float32)
        small = rng.integers(0, 11, (k, 1, h, w), dtype=np.uint8)
        labels = small.repeat(14, axis=2).repeat(14, axis=3)[..., :rows, :cols]
        hackathon = protocol_labels(small[:, 0], spec.class_map)
        cache.write_unit_data(
            unit, feats.astype(np.float16), np.ascontiguousarray(labels), None, hackathon
        )
        group.append(unit)
        if len(group) == per_commit or unit == cache.num_units - 1:
            cache.commit_units(group)
            group = []
    cache.finalize()
    return cache


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall times measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"{what}; torch {torch.__version__}; {date.today()}"


def spawn_map(fn: Callable, tasks: Iterable, jobs: int) -> Iterator:
    """`fn` over `tasks` in `jobs` fresh processes (spawned: no torch state inherited), the
    results in task order as they come."""
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        yield from pool.map(fn, tasks)


def spread(values: list[float]) -> float:
    """The sample standard deviation (0 for a single value)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_sd(values: list[float]) -> str:
    """'0.279 ± 0.007': a score over seeds as the studies' tables print it."""
    return f"{statistics.mean(values):.3f} ± {spread(values):.3f}"


def table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format(*header), line.format(*("-" * w for w in widths))]
    out += [line.format(*(str(c) for c in r)) for r in rows]
    return "\n".join(out)


def protocol_labels(blocks: np.ndarray, class_map) -> np.ndarray:
    """(N, h, w) token-grid class ids -> (N, 266, 476) hackathon ids at the protocol's own size
    (nearest neighbour), as a cache stores them."""
    from offroad_seg.metrics.hackathon import HACKATHON_SIZE, to_hackathon_ids

    rows = np.arange(HACKATHON_SIZE[0]) * blocks.shape[1] // HACKATHON_SIZE[0]
    cols = np.arange(HACKATHON_SIZE[1]) * blocks.shape[2] // HACKATHON_SIZE[1]
    return to_hackathon_ids(blocks[:, rows][:, :, cols], class_map).astype(np.uint8)
