"""Head study: every head at a few widths and batch sizes, several seeds, val mIoU and time.

    python bench/head_study.py [--train 24 --val 8] [--epochs 20] [--seeds 0,1,2]
        [--grid "linear=0;seed=128;convnext=96,192;pyramid=32,64"] [--batches 2,8]
        [--layers 1] [--data TRAIN --val-data VAL]

Extracts a training and a validation split once (synthetic scenes of different seeds unless
`--data`/`--val-data` are given; the backbone of `--weights`, untrained by default), then
trains each (head, width, batch size) with each seed for `--epochs` epochs on the cached
features, and prints per setting: validation mIoU (best epoch) mean and spread over the
seeds, seconds per epoch, parameters. The reference row is `--preset seed` (the hackathon's
head, batch 2, AdamW 3e-4, 20 epochs, weighted cross entropy). The features are loaded once
per cache and shared by every run, as `sweep` does.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import replace

from common import base_parser, ensure_cache, machine, setup, table, validation_data

from offroad_seg.config import TrainConfig
from offroad_seg.models.heads import HeadConfig, build_head, count_parameters
from offroad_seg.training.inputs import load_training_data
from offroad_seg.training.loop import train


def parse_grid(text: str) -> list[tuple[str, int]]:
    """'linear=0;convnext=96,192' -> [('linear', 0), ('convnext', 96), ('convnext', 192)]"""
    out = []
    for part in text.split(";"):
        head, widths = part.split("=")
        out += [(head.strip(), int(w)) for w in widths.split(",")]
    return out


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--train", type=int, default=24, help="synthetic training images")
    p.add_argument("--val", type=int, default=8, help="synthetic validation images")
    p.add_argument("--val-data", help="a validation dataset folder (with --data)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--grid", default="linear=0;seed=64,128;convnext=96,192,256;pyramid=32,64,96")
    p.add_argument("--batches", default="2,8")
    p.add_argument("--layers", type=int, default=1)
    args = p.parse_args()
    args.images = args.train
    data, device = setup(args)
    val_data = validation_data(args)
    logging.getLogger("offroad_seg").setLevel(logging.WARNING)
    tag = f"L{args.layers}"
    train_cache = ensure_cache(data, args.workdir / f"study-{tag}-train.zarr", args,
                               layers=args.layers, views=("identity", "hflip"))  # fmt: skip
    val_cache = ensure_cache(val_data, args.workdir / f"study-{tag}-val.zarr", args,
                             layers=args.layers)  # fmt: skip
    seeds = [int(s) for s in args.seeds.split(",")]
    base = TrainConfig(
        caches=(train_cache,),
        out=args.workdir / "study-run",
        val_cache=val_cache,
        epochs=args.epochs,
        device=str(device),
        progress=False,
        overwrite=True,
    )
    data_once = load_training_data(base, device)
    channels = data_once.caches[0].channels
    settings = [("seed preset", "seed", 0, 2, "seed")]
    for batch in (int(b) for b in args.batches.split(",")):
        settings += [
            (f"{h} w{w or '-'} b{batch}", h, w, batch, None) for h, w in parse_grid(args.grid)
        ]
    rows = []
    for label, head, width, batch, preset in settings:
        scores, epoch_s = [], []
        for seed in seeds:
            cfg = replace(base, head=head, width=width, batch_size=batch, seed=seed, preset=preset)
            started = time.perf_counter()
            result = train(cfg, data=data_once)
            scores.append(result.best["val_miou"])
            epoch_s.append((time.perf_counter() - started) / args.epochs)
        params = count_parameters(
            build_head(HeadConfig(name=head, in_channels=channels, layers=args.layers,
                                  width=width if head != "linear" else 0))
        )  # fmt: skip
        row = (
            label,
            " ".join(f"{s:.4f}" for s in scores),
            f"{statistics.mean(scores):.4f}",
            f"{statistics.stdev(scores) if len(scores) > 1 else 0:.4f}",
            f"{statistics.mean(epoch_s):.2f}",
            f"{params / 1e3:.0f} k",
        )
        rows.append(row)
        print("  ".join(row), flush=True)
    print(f"\n{machine(device)}; {args.epochs} epochs; train {data}, val {val_data}, {tag}\n")
    print(table(rows, ("setting", "val mIoU per seed", "mean", "std", "s/epoch", "params")))


if __name__ == "__main__":
    main()
