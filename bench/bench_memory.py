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

from common import random_cache, table

from offroad_seg.features.cache import FeatureCache


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
            random_cache(path, n)
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
