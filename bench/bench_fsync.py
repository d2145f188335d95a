"""Durability: what fsyncing chunks before marking them done costs, by group size.

    python bench/bench_fsync.py [--images 512] [--groups 1,4,16,32] [--views 1] [--repeat 3]
        [--workdir runs/bench]

Writes the same cache (random float16 features and blocky labels at the default working size,
~1 MiB feature chunks) through extract's own `ChunkWriter` (chunks written on one thread,
committed on another), with the chunks committed in groups of G (one fsync pass over the
group's files and folders, then their `done` flags; extract commits one group per backbone
batch: 4 chunks at the CPU default batch of 8, 32 at the CUDA default of 64), and once without
any fsync (zarr's own behaviour, which a power loss could betray). Prints the best seconds,
MB/s and images/s of each (fsyncs run on the commit thread, overlapping the writes) and the
median time of one group's fsync pass. The disk matters: run it on the disk your caches live
on (`--workdir`).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from common import protocol_labels, table

from offroad_seg.core import storage
from offroad_seg.data.classes import ClassMap
from offroad_seg.features.cache import FeatureCache
from offroad_seg.features.cache_format import CacheSpec
from offroad_seg.features.extract import ChunkWriter
from offroad_seg.models.backbone import BackboneSpec
from offroad_seg.models.preprocess import Preprocessing


def spec(n: int, views: int) -> CacheSpec:
    return CacheSpec(
        backbone=BackboneSpec(weights_sha256="0" * 64, weights_source="bench"),
        preprocessing=Preprocessing(),
        class_map=ClassMap.default(),
        names=tuple(f"{i:07d}.png" for i in range(n)),
        sources_digest="bench",
        views=("identity", "hflip")[:views],
    )


def chunk_data(cache: FeatureCache, seed: int) -> list[tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    (h, w), (rows, cols) = cache.spec.preprocessing.grid, cache.spec.preprocessing.size
    out = []
    for chunk in range(cache.num_chunks):
        start, stop = cache.chunk_range(chunk)
        shape = (stop - start, cache.num_views)
        feats = rng.standard_normal((*shape, cache.channels, h, w), np.float32)
        small = rng.integers(0, 11, (*shape, h, w), dtype=np.uint8)
        labels = small.repeat(14, axis=2).repeat(14, axis=3)[..., :rows, :cols]
        hackathon = protocol_labels(small[:, 0], cache.spec.class_map)
        out.append((feats.astype(np.float16), np.ascontiguousarray(labels), None, hackathon))
    return out


def write_all(path: Path, n: int, views: int, data, group: int | None) -> tuple[float, list[float]]:
    """Seconds to write and commit every chunk with extract's `ChunkWriter` (writes on one
    thread, commits on another), a group every `group` chunks (None: never fsync), and the
    seconds of each group's fsync pass."""
    shutil.rmtree(path, ignore_errors=True)
    real = storage.sync_files
    syncs: list[float] = []

    def timed(path, keys) -> None:
        t = time.perf_counter()
        real(path, keys)
        syncs.append(time.perf_counter() - t)

    storage.sync_files = timed if group is not None else (lambda path, keys: None)
    try:
        cache = FeatureCache.create(path, spec(n, views))
        syncs.clear()  # the creation's own
        writer = ChunkWriter(cache)
        t = time.perf_counter()
        for chunk in range(cache.num_chunks):
            writer.write(chunk, *data[chunk])
            if (chunk + 1) % (group or 16) == 0:
                writer.end_group()
        writer.drain()
        seconds = time.perf_counter() - t
        assert cache.done().all()
        return seconds, syncs
    finally:
        storage.sync_files = real


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--groups", default="1,4,16,32", help="chunks per commit")
    p.add_argument("--views", type=int, default=1, choices=[1, 2])
    p.add_argument("--repeat", type=int, default=3, help="best of N")
    p.add_argument("--workdir", type=Path, default=Path("runs/bench"))
    args = p.parse_args()
    path = args.workdir / "bench-fsync.zarr"
    probe = FeatureCache.create(path, spec(args.images, args.views), overwrite=True)
    data = chunk_data(probe, 0)
    per_chunk_mb = sum(f.nbytes + lab.nbytes for f, lab, *_ in data) / len(data) / 1e6
    groups: list[int | None] = [None, *(int(g) for g in args.groups.split(","))]
    best = {g: float("inf") for g in groups}
    syncs: dict[int | None, list[float]] = {g: [] for g in groups}
    for _ in range(args.repeat):  # alternate the settings so that disk noise hits all alike
        for g in groups:
            seconds, group_syncs = write_all(path, args.images, args.views, data, g)
            best[g] = min(best[g], seconds)
            syncs[g] += group_syncs
    shutil.rmtree(path, ignore_errors=True)
    chunks = len(data)
    rows = []
    for g in groups:
        s = best[g]
        ms = statistics.median(syncs[g]) * 1e3 if syncs[g] else 0.0
        rows.append(
            (
                "no fsync (zarr alone)" if g is None else f"fsync groups of {g}",
                f"{s:.2f}",
                f"{chunks * per_chunk_mb / s:.0f}",
                f"{args.images / s:.0f}",
                f"{s / best[None]:.2f}",
                "-" if g is None else f"{ms:.1f}",
                "-" if g is None else f"{ms / g:.2f}",
            )
        )
    print(
        f"{args.images} images, {chunks} chunks of {probe.images_per_chunk} images x "
        f"{args.views} view(s), {per_chunk_mb:.2f} MB raw per chunk, in {args.workdir}"
    )
    header = ("commit", "seconds", "MB/s", "images/s", "vs none", "fsync ms/group", "ms/chunk")
    print(table(rows, header))


if __name__ == "__main__":
    main()
