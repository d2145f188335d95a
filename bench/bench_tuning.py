"""Tuning the last blocks: an epoch from a block cache vs. the same epoch online from images.

    python bench/bench_tuning.py [--images 16 --size 140x252] [--block 8] [--modes lora,full]
        [--epochs 2] [--batch-size 2] [--head upnext] [--device cpu]

  cached  `train --tune MODE` on a cache of the tokens entering block `--block`
          (`extract --block`): each step runs blocks K..N-1, the final norm and the head
  online  the same model and steps from the images: decode + resize (workers), normalise,
          blocks 0..K-1 (no gradients), then blocks K..N-1 + norm + head with gradients

Both in one run, side by side, with the same model (ViT-S/14 by default, LoRA rank 8 or full
tuning of blocks K..11, `--head`), batch and image count; the cached epoch's time is
the median over `--epochs` epochs of `train`'s own per-epoch seconds (the first included
when there is one), the online one's over the same number of epochs. The ratio online /
cached is what the block cache buys.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch
from common import base_parser, ensure_cache, machine, online_inputs, setup, sync, table

from offroad_seg.core.runtime import autocast
from offroad_seg.models.backbone import stored_tokens
from offroad_seg.models.heads import HeadConfig, build_head
from offroad_seg.models.preprocess import normalize
from offroad_seg.models.tuning import TunedModel, TuneSpec
from offroad_seg.training.loop import TrainConfig, make_optimizer, train
from offroad_seg.training.losses import segmentation_loss


def cached_epoch(cache, args, device, mode: str) -> float:
    out = args.workdir / f"tune-{mode}-b{args.block}-{args.head}"
    cfg = TrainConfig(
        caches=(cache,), out=out, tune=mode, head=args.head, epochs=args.epochs,
        batch_size=args.batch_size, device=str(device), weights=args.weights, overwrite=True,
        progress=False,
    )  # fmt: skip
    result = train(cfg)
    return statistics.median(row["seconds"] for row in result.history)


def online_epoch(data, args, device, mode: str) -> float:
    """The same tuning without the cache: the first K blocks run on every image every epoch."""
    prep, backbone, loader = online_inputs(data, args, device)
    torch.manual_seed(0)
    head = build_head(HeadConfig(name=args.head, in_channels=backbone.spec.channels)).to(device)
    spec = TuneSpec(mode, args.block, 8 if mode == "lora" else 0, 16.0 if mode == "lora" else 0)
    model = TunedModel(backbone, head, spec, prep.grid).to(device).train()
    opt = make_optimizer(model, 3e-4, 0.01)

    def epoch():
        for batch in loader:
            x = normalize(batch["image"].to(device), prep)
            labels = batch["labels"].to(device, non_blocking=True)
            with autocast(device):
                with torch.no_grad():
                    tokens = backbone.tokens_entering(x, args.block)
                logits = model(stored_tokens(tokens.float()))
            loss = segmentation_loss(logits.float(), labels, None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    times = []
    for _ in range(args.epochs):
        sync(device)
        t = time.perf_counter()
        epoch()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = base_parser(__doc__)
    p.set_defaults(images=16, size="140x252")
    p.add_argument("--block", type=int, default=8, help="the first tuned block (ViT-S: of 12)")
    p.add_argument("--modes", default="lora", help="comma-separated: lora, full")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--head", default="upnext", help="the head on the blocks (default: train's)")
    args = p.parse_args()
    data, device = setup(args)
    logging.getLogger("offroad_seg").setLevel(logging.WARNING)
    cache = ensure_cache(
        data, args.workdir / f"block{args.block}-{args.size}-{args.images}.zarr", args,
        block=args.block, dtype="float16",
    )  # fmt: skip
    rows = []
    for mode in args.modes.split(","):
        cached = cached_epoch(cache, args, device, mode)
        online = online_epoch(data, args, device, mode)
        rows.append((mode, f"{cached:.2f}", f"{online:.2f}", f"{online / cached:.2f}x"))
    print(machine(device))
    print(
        f"{args.images} images at {args.size}, batch {args.batch_size}, tuning blocks "
        f"{args.block}..11 of ViT-S/14 + {args.head} head (the tokens entering block "
        f"{args.block} cached)"
    )
    print(table(rows, ("tune", "cached s/epoch", "online s/epoch", "online / cached")))


if __name__ == "__main__":
    main()
