"""The measured inputs of docs/million-frames.md: a cache's files and bytes per image, extract
and streamed-epoch rates at a tiny working size, and a shared sweep study's cost per trial.

    python bench/bench_million.py [--images 2000] [--unique 50] [--size 56x56]
        [--full-images 64] [--storage postgresql://...] [--trials 100] [--workdir runs/bench]

1. Files and bytes per image of a finished cache at the real working size (266x476, random
   float16 features: they compress like real ones to within ~15%, common.random_cache).
2. A synthetic dataset of N images at 112x64 (`--unique` rendered scenes, hard-linked under N
   names: decoding, extraction and writing see N images), extracted at `--size` with an
   untrained ViT-S/14 (speed does not depend on the weights): images/s, files, bytes.
3. One training epoch of the default head on that cache, streamed from disk (`stream=True`)
   and from memory: seconds and images/s.
4. A sweep study's bookkeeping per trial (ask, the sweep's attributes, a heartbeat, tell), on
   `--storage` (default: SQLite in the work folder): milliseconds per trial.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from common import random_cache, table

from offroad_seg.config import ExtractConfig, TrainConfig
from offroad_seg.data.synthetic import write_split
from offroad_seg.features.extract import extract
from offroad_seg.models.preprocess import parse_size
from offroad_seg.training.loop import train


def files_and_bytes(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def linked_dataset(root: Path, n: int, unique: int) -> Path:
    """N images (and masks) named 0000000.png..., hard links to `unique` rendered scenes."""
    data = root / f"tiny{n}"
    if (data / "Segmentation").is_dir() and len(os.listdir(data / "Segmentation")) == n:
        return data
    shutil.rmtree(data, ignore_errors=True)
    scenes = root / f"scenes{unique}"
    if not (scenes / "Segmentation").is_dir():
        write_split(scenes, unique, seed=3, width=112, height=64)
    for folder in ("Color_Images", "Segmentation"):
        sources = sorted((scenes / folder).iterdir())
        (data / folder).mkdir(parents=True)
        for i in range(n):
            os.link(sources[i % unique], data / folder / f"{i:07d}.png")
    return data


def study_ms_per_trial(url: str, trials: int) -> float:
    """Milliseconds of the study's bookkeeping per trial, as a sweep process does it."""
    import optuna

    from offroad_seg.config import SweepConfig
    from offroad_seg.training.sweep.study import ask_with_heartbeat, open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = SweepConfig(train=TrainConfig(caches=(), out=Path(".")), storage=url)
    storage = open_storage(cfg)
    name = f"bench-{time.time_ns()}"
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    start = time.perf_counter()
    for i in range(trials):
        trial = ask_with_heartbeat(study)
        for key, value in (("host", "node"), ("pid", 1), ("sample", i), ("run", f"t{i}")):
            trial.set_user_attr(key, value)
        trial.suggest_float("lr", 1e-5, 1e-2, log=True)
        storage.record_heartbeat(trial._trial_id)
        study.tell(trial, 0.5)
    seconds = time.perf_counter() - start
    optuna.delete_study(study_name=name, storage=storage)
    return 1000 * seconds / trials


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--unique", type=int, default=50)
    p.add_argument("--size", default="56x56")
    p.add_argument("--full-images", type=int, default=64)
    p.add_argument("--storage", default=None)
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--workdir", type=Path, default=Path("runs/bench"))
    args = p.parse_args()
    root = args.workdir / "million"
    root.mkdir(parents=True, exist_ok=True)
    rows = []

    full = random_cache(root / "full.zarr", args.full_images)
    files, size = files_and_bytes(root / "full.zarr")
    rows += [
        ["266x476 cache: images per chunk", full.images_per_chunk],
        ["266x476 cache: files per image", f"{files / args.full_images:.3f}"],
        ["266x476 cache: kB per image", f"{size / args.full_images / 1e3:.1f}"],
    ]

    data = linked_dataset(root, args.images, args.unique)
    cache = root / "tiny.zarr"
    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    extract(ExtractConfig(data_dir=data, cache=cache, weights="random", size=parse_size(args.size),
                          device="cpu", progress=False))  # fmt: skip
    seconds = time.perf_counter() - start
    files, size = files_and_bytes(cache)
    rows += [
        [f"{args.size} extract: images/s (CPU)", f"{args.images / seconds:.1f}"],
        [f"{args.size} cache: files per 10k images", f"{files / args.images * 1e4:.0f}"],
        [f"{args.size} cache: kB per image", f"{size / args.images / 1e3:.2f}"],
    ]

    for stream in (True, False):
        out = root / f"train-{'stream' if stream else 'memory'}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = TrainConfig(caches=(cache,), out=out, epochs=1, stream=stream, device="cpu",
                          progress=False, batch_size=64)  # fmt: skip
        outcome = train(cfg)
        epoch = outcome.history[0]["seconds"]
        what = "streamed from disk" if stream else "from memory"
        rows.append([f"{args.size} epoch {what}: images/s (CPU, batch 64)",
                     f"{args.images / epoch:.0f}"])  # fmt: skip

    url = args.storage or f"sqlite:///{(root / 'study.db').resolve()}"
    where = "postgresql" if url.startswith("postgres") else "sqlite"
    ms = study_ms_per_trial(url, args.trials)
    rows.append([f"sweep bookkeeping per trial ({where})", f"{ms:.1f} ms"])
    print(f"{args.images} images ({args.unique} unique scenes), {os.cpu_count()} CPUs")
    print(table(rows, ("measured", "value")))


if __name__ == "__main__":
    main()
