"""Scale augmentation and ensembles on the two proxies of the head study (#25 items 4, 5).

    python bench/bench_levers.py [--train 12 --val 6] [--size 126x224] [--epochs 8]
        [--seeds 0,1,2] [--head upnext] [--difficulty 0.5] [--jobs 2]

The proxies are bench/head_study.py's: `semantic` (bench/semantic_proxy.py's tokens made from
the label maps) and `untrained` (a random ViT-S/14 on the synthetic scenes). The training split
is extracted at 0.75x, 1x and 1.25x the working size (each rounded to the patch, 14), the
validation split at 1x. Arms, each trained with every seed and scored by its best epoch's
validation mIoU (mean ± sd over seeds):

  one size          the 1x cache
  one size, 3x ep   the 1x cache for 3x the epochs: the steps of the three-size arm
  three sizes       the 0.75x, 1x and 1.25x caches together (batches of one size each)
  ensemble of 3     the one-size arm's heads (one per seed) averaged, beside its best one

Small on purpose (a few minutes on two busy cores): what it can say is whether a lever moves
a proxy's mIoU, not what it does on real DINOv2 features of real desert scenes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from common import base_parser, ensure_cache, machine, mean_sd, setup, spawn_map, validation_data
from semantic_proxy import write_semantic_cache

from offroad_seg.config import TrainConfig
from offroad_seg.features.cache import FeatureCache
from offroad_seg.models.checkpoint import load_checkpoint
from offroad_seg.models.heads.ensemble import EnsembleHead
from offroad_seg.models.preprocess import parse_size
from offroad_seg.training.loop import train
from offroad_seg.training.validation import evaluate_on_cache

SCALES = (0.75, 1.0, 1.25)
PATCH = 14


def scaled(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """A working size times `scale`, each side rounded to a multiple of the patch."""
    return tuple(max(PATCH, round(v * scale / PATCH) * PATCH) for v in size)


def cache_at(data: Path, path: Path, size, args) -> Path:
    return ensure_cache(data, path, args, size=size, device="cpu", workers=0)


def semantic(source: Path, difficulty: float) -> Path:
    dest = source.with_name(source.name.replace(".zarr", f"-semantic{difficulty:g}.zarr"))
    if not (dest / "zarr.json").exists():
        write_semantic_cache(source, dest, difficulty)
    return dest


def _train_one(cfg: TrainConfig) -> float:
    torch.set_num_threads(1)
    logging.getLogger("offroad_seg").setLevel(logging.WARNING)
    return train(cfg).best["val_miou"]


def ensemble_miou(heads: list[Path], val: Path) -> float:
    head = EnsembleHead([load_checkpoint(h).build() for h in heads])
    return evaluate_on_cache(head, FeatureCache.open(val), torch.device("cpu"), None).miou


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--train", type=int, default=12)
    p.add_argument("--val", type=int, default=6)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--head", default="upnext")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--difficulty", type=float, default=0.5)
    p.add_argument("--jobs", type=int, default=2)
    p.set_defaults(size="126x224")
    args = p.parse_args()
    args.images = args.train
    started = time.perf_counter()
    data, _ = setup(args)
    val_data = validation_data(args)
    logging.getLogger("offroad_seg").setLevel(logging.WARNING)
    base = parse_size(args.size)
    sizes = [scaled(base, s) for s in SCALES]
    wd = args.workdir / "levers"
    untrained = {
        "train": [cache_at(data, wd / f"train-{r}x{c}.zarr", (r, c), args) for r, c in sizes],
        "val": cache_at(val_data, wd / f"val-{base[0]}x{base[1]}.zarr", base, args),
    }
    proxies = {
        "semantic": {
            "train": [semantic(c, args.difficulty) for c in untrained["train"]],
            "val": semantic(untrained["val"], args.difficulty),
        },
        "untrained": untrained,
    }
    seeds = [int(s) for s in args.seeds.split(",")]
    one = SCALES.index(1.0)
    arms = {
        "one size": lambda c: ((c[one],), args.epochs),
        "one size, 3x epochs": lambda c: ((c[one],), 3 * args.epochs),
        "three sizes": lambda c: (tuple(c), args.epochs),
    }
    tasks, keys = [], []
    for proxy, caches in proxies.items():
        for arm, pick in arms.items():
            train_caches, epochs = pick(caches["train"])
            for seed in seeds:
                out = wd / "runs" / f"{proxy}-{arm.replace(' ', '').replace(',', '-')}-{seed}"
                cfg = TrainConfig(
                    caches=train_caches, out=out, val_cache=caches["val"], head=args.head,
                    epochs=epochs, batch_size=args.batch, seed=seed, device="cpu",
                    progress=False, overwrite=True,
                )  # fmt: skip
                tasks.append(cfg)
                keys.append((proxy, arm))
    scores: dict = {}
    for key, score in zip(keys, spawn_map(_train_one, tasks, args.jobs), strict=True):
        scores.setdefault(key, []).append(score)
    heads = {}
    for cfg, key in zip(tasks, keys, strict=True):
        heads.setdefault(key, []).append(cfg.out / "segmentation_head.pth")

    print(
        f"\n{machine(torch.device('cpu'))}; {args.head} head, train {args.train} synthetic "
        f"scenes at {', '.join(f'{r}x{c}' for r, c in sizes)}, val {args.val} at "
        f"{base[0]}x{base[1]}; {args.epochs} epochs, batch {args.batch}, seeds {args.seeds}; "
        f"semantic difficulty {args.difficulty:g}; {(time.perf_counter() - started) / 60:.1f} "
        "min in all\n"
    )
    print("| arm | " + " | ".join(f"{p} val mIoU" for p in proxies) + " |")
    print("|---" * (len(proxies) + 1) + "|")
    for arm in arms:
        print(f"| {arm} | " + " | ".join(mean_sd(scores[(p, arm)]) for p in proxies) + " |")
    best = {p: max(scores[(p, "one size")]) for p in proxies}
    ens = {p: ensemble_miou(heads[(p, "one size")], proxies[p]["val"]) for p in proxies}
    print("| best single of 'one size' | " + " | ".join(f"{best[p]:.3f}" for p in proxies) + " |")
    print(
        f"| ensemble of those {len(seeds)} | " + " | ".join(f"{ens[p]:.3f}" for p in proxies) + " |"
    )


if __name__ == "__main__":
    main()
