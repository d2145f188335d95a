"""Frozen vs LoRA vs full tuning of the last blocks, in the style of the head study (#25).

    python bench/bench_tuning_study.py [--train 16 --val 8] [--size 126x224] [--epochs 6]
        [--seeds 0,1,2] [--head upnext] [--block 8] [--backbone-lr LR] [--layer-scale G]
        [--jobs 2]

On the head study's `untrained` proxy only (bench/head_study.py): the backbone of `--weights`
(a random-weights ViT-S/14 by default) on the project's synthetic scenes. Its other proxy,
`semantic` (bench/semantic_proxy.py), replaces the backbone's output tokens with tokens made
from the label maps: there are no backbone blocks behind those tokens, so tuning blocks on it
would mean nothing. Arms, each trained with every seed, the same head, epochs, batch and head
learning rate, and scored by its best epoch's validation mIoU (mean ± sd over seeds):

  frozen  the head on a cache of final features (`extract`)
  lora    `train --tune lora` (rank 8, alpha 16) on a cache of the tokens entering block
          `--block` (`extract --block`): blocks K..N-1 + final norm + head
  full    `train --tune full` on the same block cache (blocks' learning rate: `--backbone-lr`,
          default train's, a tenth of the head's)

A random DINOv2 ViT starts its LayerScale at 1e-5 (`ls1`, `ls2`: each block adds 1e-5 times its
attention and MLP outputs), so its blocks are almost the identity: LoRA (which leaves LayerScale
as it is) cannot change the features, and full tuning only as far as it grows LayerScale.
`--layer-scale G` sets every block's LayerScale of the random backbone to G (a weights file
written to the work folder): with G = 1 the blocks change the tokens, and tuning them can matter.

Seconds per epoch: the median over every seed's epochs of train's own per-epoch seconds
(training and validation); `--jobs` trainings run at a time with one thread each, so the arms'
times compare with each other, not with a whole machine's. Trainable parameters: what the
optimizer updates (head; + adapters or blocks, and the final norm).

Small on purpose (minutes on two busy cores). What an untrained-backbone proxy can say is how
the arms compare when the blocks carry no pretrained semantics: a random backbone's last blocks
can learn from scratch, so tuning may look better here than on real DINOv2 features (whose
frozen features are already good), or worse (LoRA's small updates cannot turn random blocks
into useful ones, and full tuning's tenth of the learning rate moves them little).
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import torch
from common import (
    base_parser,
    ensure_cache,
    machine,
    mean_sd,
    setup,
    spawn_map,
    table,
    validation_data,
)

from offroad_seg.config import TrainConfig
from offroad_seg.features.cache import FeatureCache
from offroad_seg.models.backbone import load_backbone
from offroad_seg.models.checkpoint import load_checkpoint
from offroad_seg.models.heads import build_head
from offroad_seg.models.weights import RANDOM
from offroad_seg.training.loop import train
from offroad_seg.training.tuned import trained_model, tune_spec

ARMS = ("frozen", "lora", "full")


def _train_one(cfg: TrainConfig) -> tuple[float, list[float]]:
    """One training in a worker process (one thread): its best validation mIoU and the
    seconds of each epoch."""
    torch.set_num_threads(1)
    logging.getLogger("offroad_seg").setLevel(logging.WARNING)
    result = train(cfg)
    return result.best["val_miou"], [row["seconds"] for row in result.history]


def trainable_parameters(cfg: TrainConfig) -> int:
    """What the optimizer of a finished run updated, rebuilt the way train builds it."""
    cache = FeatureCache.open(cfg.caches[0])
    head = build_head(load_checkpoint(cfg.out / "segmentation_head.pth").head_config)
    model = trained_model(cfg, cache, head, tune_spec(cfg, cache), torch.device("cpu"))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def layer_scaled_weights(path: Path, gamma: float) -> str:
    """A weights file of the random backbone with every block's LayerScale set to `gamma`."""
    if not path.is_file():
        vit = load_backbone(RANDOM).vit
        for block in vit.blocks:
            block.ls1.gamma.data.fill_(gamma)
            block.ls2.gamma.data.fill_(gamma)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(vit.state_dict(), path)
    return str(path)


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--train", type=int, default=16)
    p.add_argument("--val", type=int, default=8)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--head", default="upnext")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--block", type=int, default=8, help="the first tuned block (ViT-S: of 12)")
    p.add_argument("--backbone-lr", type=float, default=None, help="default: train's")
    p.add_argument(
        "--layer-scale",
        type=float,
        default=None,
        help="set the random backbone's LayerScale to this (default: its 1e-5)",
    )
    p.add_argument("--jobs", type=int, default=2)
    p.set_defaults(size="126x224", device="cpu")
    args = p.parse_args()
    args.images = args.train
    started = time.perf_counter()
    data, _ = setup(args)
    val_data = validation_data(args)
    logging.getLogger("offroad_seg").setLevel(logging.WARNING)
    wd = args.workdir / "tuning-study"
    backbone = args.weights
    if args.layer_scale is not None:
        backbone = f"random, LayerScale {args.layer_scale:g}"
        args.weights = layer_scaled_weights(wd / f"vits14-ls{args.layer_scale:g}.pth",
                                            args.layer_scale)  # fmt: skip
    wd = wd / Path(args.weights).stem
    tag = f"{args.size}-{args.train}"
    final = {
        "train": ensure_cache(data, wd / f"train-{tag}.zarr", args),
        "val": ensure_cache(val_data, wd / f"val-{args.size}-{args.val}.zarr", args),
    }
    block = {
        "train": ensure_cache(data, wd / f"train-{tag}-b{args.block}.zarr", args,
                              block=args.block),
        "val": ensure_cache(val_data, wd / f"val-{args.size}-{args.val}-b{args.block}.zarr",
                            args, block=args.block),
    }  # fmt: skip
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks, arms = [], []
    for arm in ARMS:
        caches = final if arm == "frozen" else block
        for seed in seeds:
            cfg = TrainConfig(
                caches=(caches["train"],), out=wd / "runs" / f"{arm}-{seed}",
                val_cache=caches["val"], head=args.head, epochs=args.epochs,
                batch_size=args.batch, seed=seed, device="cpu", progress=False, overwrite=True,
                tune=None if arm == "frozen" else arm, backbone_lr=args.backbone_lr,
                weights=args.weights,
            )  # fmt: skip
            tasks.append(cfg)
            arms.append(arm)
    scores: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    for arm, (score, secs) in zip(arms, spawn_map(_train_one, tasks, args.jobs), strict=True):
        scores.setdefault(arm, []).append(score)
        seconds.setdefault(arm, []).extend(secs)
    params = {arm: trainable_parameters(tasks[arms.index(arm)]) for arm in ARMS}

    print(
        f"\n{machine(torch.device('cpu'))}; {args.head} head, ViT-S/14 weights {backbone}, "
        f"tuned blocks {args.block}..11; train {args.train} synthetic scenes, val {args.val}, at "
        f"{args.size}; {args.epochs} epochs, batch {args.batch}, seeds {args.seeds}, "
        f"{args.jobs} jobs x 1 thread; {(time.perf_counter() - started) / 60:.1f} min in all\n"
    )
    rows = [
        (arm, mean_sd(scores[arm]), f"{statistics.median(seconds[arm]):.1f}", f"{params[arm]:,}")
        for arm in ARMS
    ]
    print(table(rows, ("arm", "val mIoU (best epoch)", "s/epoch", "trainable parameters")))


if __name__ == "__main__":
    main()
