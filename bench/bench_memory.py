"""Memory: training from a cache larger than the memory budget streams with bounded memory.

    python bench/bench_memory.py [--images 500 2000 4000] [--budget-gb 0.2]

Writes caches of random features (no backbone needed) and trains one epoch on each in fresh
processes: streamed (the cache exceeds `--budget-gb`) and loaded into memory. Prints each run's
peak resident memory next to the cache's size: streaming stays flat as the cache grows.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import table

from offroad_seg.backbone import BackboneSpec
from offroad_seg.cache import CacheSpec, FeatureCache
from offroad_seg.data import ClassMap
from offroad_seg.preprocess import Preprocessing


def fake_cache(path: Path, n: int) -> FeatureCache:
    spec = CacheSpec(
        backbone=BackboneSpec(weights_sha256="0" * 64, weights_source="bench"),
        preprocessing=Preprocessing(),
        class_map=ClassMap.default(),
        names=tuple(f"{i:07d}.png" for i in range(n)),
        sources_digest="bench",
    )
    cache = FeatureCache.create(path, spec, overwrite=True)
    rng = np.random.default_rng(0)
    (h, w), (rows, cols) = spec.preprocessing.grid, spec.preprocessing.size
    for chunk in range(cache.num_chunks):
        start, stop = cache.chunk_range(chunk)
        k = stop - start
        feats = rng.standard_normal((k, 1, 384, h, w), dtype=np.float32).astype(np.float16)
        # blocky labels, like real ones (they compress like real ones too)
        small = rng.integers(0, 11, (k, 1, h, w), dtype=np.uint8)
        labels = small.repeat(14, axis=2).repeat(14, axis=3)[..., :rows, :cols]
        cache.write_chunk(chunk, feats, np.ascontiguousarray(labels))
    cache.finalize()
    return cache


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in bytes, seconds) of a child process, measured in a small parent process."""
    t = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, *cmd], check=True, capture_output=True, text=True
    )
    seconds = time.perf_counter() - t
    return float(run.stdout.strip().splitlines()[-1]), seconds


# a tiny parent per run, so that RUSAGE_CHILDREN's high-water mark is this run's alone
_MEASURE = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, nargs="+", default=[500, 2000, 4000])
    p.add_argument("--budget-gb", type=float, default=0.2)
    p.add_argument("--workdir", type=Path, default=Path("runs/bench"))
    args = p.parse_args()
    rows = []
    streamed = []
    for n in args.images:
        path = args.workdir / f"fake{n}.zarr"
        if not (path / "zarr.json").exists():
            fake_cache(path, n)
        cache = FeatureCache.open(path)
        size = cache.array("features").nbytes + cache.array("labels").nbytes
        base = [
            sys.executable,
            "-m",
            "offroad_seg",
            "-q",
            "train",
            str(path),
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--width",  # a narrow head keeps the epochs short: memory does not depend on it
            "32",
            "--device",
            "cpu",
        ]
        for name, extra in (
            ("streamed", ["--stream", "--memory-budget-gb", str(args.budget_gb)]),
            ("in memory", []),
        ):
            out = args.workdir / "mem-run"
            shutil.rmtree(out, ignore_errors=True)
            rss, seconds = peak_rss([*base, str(out), *extra])
            rows.append((n, f"{size / 1e9:.2f}", name, f"{rss / 1e9:.2f}", f"{seconds:.0f}"))
            if name == "streamed":
                streamed.append(rss)
    print("one training epoch per run, each in a fresh process (peak RSS includes ~0.7 GB of")
    print("torch, zarr and the model before any feature is read)")
    print(table(rows, ("images", "cache GB", "features", "peak RSS GB", "seconds")))
    print(
        f"streaming peak RSS growth from {args.images[0]} to {args.images[-1]} images: "
        f"{(streamed[-1] - streamed[0]) / 1e9:+.2f} GB"
    )


if __name__ == "__main__":
    main()
