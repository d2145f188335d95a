"""Inference cost of an ensemble of tuned heads: one model whose backbone runs once up to the
shared block, vs. its members run one after another.

    python bench/bench_ensemble.py [--size 266x476] [--batch 4] [--batches 3] [--block 8]
        [--members 3] [--head upnext] [--device auto]

  single     one LoRA-tuned head (blocks K..N-1 tuned, `--block` K) on ViT-S/14
  ensemble   `--members` such heads in one checkpoint (`offroad-seg ensemble`): blocks
             0..K-1 once, then each member's blocks K..N-1, norm and head
  separate   the same members as separate models, one after another (what averaging their
             predictions by hand costs)

The members' tuned weights are random (the time does not depend on them); each time is the
median over `--batches` batches of `SegmentationModel.logits` after a warm-up batch. The
ratio separate / ensemble is what sharing the first K blocks buys; with ViT-S (12 blocks),
K = 8 and 3 members the block count alone predicts 36 / 20 = 1.8x.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch
from common import base_parser, machine, setup, sync, table

from offroad_seg.data.classes import ClassMap
from offroad_seg.models.backbone import load_backbone
from offroad_seg.models.checkpoint import head_payload, save_checkpoint
from offroad_seg.models.ensemble import write_ensemble
from offroad_seg.models.heads import HeadConfig, build_head
from offroad_seg.models.preprocess import Preprocessing, parse_size
from offroad_seg.models.segmentation import SegmentationModel
from offroad_seg.models.tuning import TunedModel, TuneSpec


def tuned_head(path, args, seed: int):
    backbone = load_backbone(args.weights)
    cfg = HeadConfig(name=args.head, in_channels=backbone.spec.channels)
    torch.manual_seed(seed)
    prep = Preprocessing(size=parse_size(args.size))
    spec = TuneSpec("lora", args.block, rank=8, alpha=16.0)
    model = TunedModel(backbone, build_head(cfg), spec, prep.grid)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not name.startswith("head."):
                p.add_(torch.randn_like(p) * 0.02)
    bb = replace(backbone.spec, block=args.block)
    payload = head_payload(
        cfg, ClassMap.default(), bb, prep, state_dict=model.state_dict(), tuning=spec.to_dict()
    )
    save_checkpoint(path, payload)
    return path


def seconds_per_batch(models, images, batches: int, device) -> float:
    for model in models:  # warm-up
        model.logits(images)
    times = []
    for _ in range(batches):
        sync(device)
        start = time.perf_counter()
        for model in models:
            model.logits(images)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--block", type=int, default=8)
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--head", default="upnext")
    args = p.parse_args()
    _, device = setup(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    heads = [
        tuned_head(args.workdir / f"ens-member-{i}.pth", args, seed=i) for i in range(args.members)
    ]
    ens = write_ensemble(heads, args.workdir / "ens.pth", overwrite=True)
    members = [SegmentationModel.from_checkpoint(h, args.weights, device) for h in heads]
    ensemble = SegmentationModel.from_checkpoint(ens, args.weights, device)
    rows, cols = parse_size(args.size)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, rows, cols), dtype=torch.uint8, generator=gen)
    single = seconds_per_batch(members[:1], images, args.batches, device)
    together = seconds_per_batch([ensemble], images, args.batches, device)
    separate = seconds_per_batch(members, images, args.batches, device)
    n = args.members
    print(f"{machine(device)}; ViT-S/14 at {rows}x{cols}, batch {args.batch}, LoRA from block "
          f"{args.block}, {args.head} heads, {n} members")  # fmt: skip
    print(
        table(
            [
                ("single tuned head", f"{single:.3f}", "1.00x"),
                (f"ensemble of {n}", f"{together:.3f}", f"{together / single:.2f}x"),
                (f"{n} members separately", f"{separate:.3f}", f"{separate / single:.2f}x"),
            ],
            ("model", "s / batch", "vs single"),
        )
    )
    print(f"separate / ensemble: {separate / together:.2f}x")


if __name__ == "__main__":
    main()
