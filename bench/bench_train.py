"""Head retraining: a cached epoch vs. the seed's online epoch vs. pure head compute.

    python bench/bench_train.py [--images 32 | --data DIR] [--head NAME[,NAME...]]
        [--online-head seed] [--device cpu]

Three ways to run one epoch over the same images at the same batch size:
  online   the seed's loop: decode + preprocess + backbone + head step, every step, with the
           seed's head (`--online-head`): what stage 2 cost before the cache
  cached   `offroad-seg train` on the feature cache (what users run), for each `--head`
  pure     the same steps on features and labels already in memory, as stored (float16 and
           uint8; on the GPU when they take at most a quarter of its free memory, else pinned
           host memory), made float32/long per batch as `train` does
All in one run, side by side. The key ratios: online / cached (the reason the cache exists)
and cached / pure (the cache's own overhead; 1.0 means free).
"""

from __future__ import annotations

import math
import shutil
import statistics
import time

import torch
from common import base_parser, ensure_cache, machine, online_inputs, resident, setup, sync, table

from offroad_seg.config import default
from offroad_seg.core.runtime import autocast
from offroad_seg.features.cache import FeatureCache
from offroad_seg.models.heads import HeadConfig, build_head, head_choices
from offroad_seg.training.loop import TrainConfig, make_optimizer, train
from offroad_seg.training.losses import class_weights_from_pixels, segmentation_loss


def online_epoch(data, args, device, head_cfg, weight) -> float:
    """The seed's loop: the backbone runs on every image of every epoch."""
    prep, backbone, loader = online_inputs(data, args, device)
    torch.manual_seed(0)
    head = build_head(head_cfg).to(device)
    opt = make_optimizer(head, 3e-4, 0.01)

    def epoch():
        for batch in loader:
            feats = backbone.encode(batch["image"], prep)
            labels = batch["labels"].to(device, non_blocking=True)
            with autocast(device):
                logits = head(feats)
            loss = segmentation_loss(logits, labels, weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    sync(device)
    t = time.perf_counter()
    epoch()
    sync(device)
    return time.perf_counter() - t


def pure_epoch(cache: FeatureCache, args, device, head_cfg, weight, epochs: int) -> float:
    """The same optimisation steps on tensors already in memory: the floor for `cached`."""
    stored, labels = cache.load_stored()
    n = len(stored)
    # as stored (float16, uint8): float32 and int64 copies of a whole dataset (~6 GB for
    # 2,857 images) would not fit the 6 GB cards many users have
    f = resident(torch.from_numpy(stored.dequantized()[:, 0].copy()), device)
    lab = resident(torch.from_numpy(labels[:, 0].copy()), device)
    torch.manual_seed(0)
    head = build_head(head_cfg).to(device)
    opt = make_optimizer(head, 3e-4, 0.01)
    times = []
    for _ in range(epochs):
        sync(device)
        t = time.perf_counter()
        for s in range(0, n, args.batch_size):
            fb = f[s : s + args.batch_size].to(device, non_blocking=True).float()
            lb = lab[s : s + args.batch_size].to(device, non_blocking=True)
            with autocast(device):
                logits = head(fb)
            loss = segmentation_loss(logits, lb, weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:] if len(times) > 1 else times)


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--head", default=default(TrainConfig, "head"), help="comma-separated heads")
    p.add_argument("--online-head", default="seed", choices=head_choices())
    p.add_argument("--batch-size", type=int, default=2, help="the seed trained with batch 2")
    p.add_argument("--epochs", type=int, default=5, help="cached/pure epochs (median taken)")
    p.add_argument("--skip-online", action="store_true")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 is steadier "
                   "on a machine shared with other work)")  # fmt: skip
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    heads = args.head.split(",")
    for head in heads:
        if head not in head_choices():
            p.error(f"--head {head}: expected one of {', '.join(head_choices())}")
    data, device = setup(args)
    cache_path = ensure_cache(data, args.workdir / f"{data.name}-{args.size}.zarr", args)
    cache = FeatureCache.open(cache_path)
    n = cache.num_images
    weight = torch.tensor(class_weights_from_pixels(cache.class_pixels()), dtype=torch.float32)
    weight = weight.to(device)

    def config(head: str) -> HeadConfig:
        return HeadConfig(name=head, in_channels=cache.channels, num_classes=11)

    online = None
    if not args.skip_online:
        online = online_epoch(data, args, device, config(args.online_head), weight)
    rows = []
    if online is not None:
        rows.append((f"online (seed loop, {args.online_head} head)", f"{online:.3f}",
                     f"{n / online:.1f}", "1.0x"))  # fmt: skip
    speed = (lambda s: f"{online / s:.1f}x") if online else (lambda s: "-")
    notes = []
    for head in heads:
        out = args.workdir / "train-run"
        shutil.rmtree(out, ignore_errors=True)
        result = train(
            TrainConfig(
                caches=(cache_path,),
                out=out,
                head=head,
                epochs=args.epochs,
                batch_size=args.batch_size,
                device=str(device),
                progress=False,
            )
        )
        epoch_times = [r["seconds"] for r in result.history]
        cached = statistics.median(epoch_times[1:] if len(epoch_times) > 1 else epoch_times)
        pure = pure_epoch(cache, args, device, config(head), weight, args.epochs)
        rows.append((f"{head}: cached ({result.source})", f"{cached:.3f}", f"{n / cached:.1f}",
                     speed(cached)))  # fmt: skip
        rows.append((f"{head}: pure head compute", f"{pure:.3f}", f"{n / pure:.1f}", speed(pure)))
        notes.append(
            f"{head}: cache overhead (cached / pure) {cached / pure:.2f}; cached epochs "
            + ", ".join(f"{t:.3f}" for t in epoch_times)
            + (f"; speed-up over online {online / cached:.1f}x" if online else "")
        )
    print(f"head retraining, {n} images, batch {args.batch_size}, {device}")
    print(f"machine: {machine(device)}")
    print(table(rows, ("epoch", "seconds", "images/s", "vs online")))
    print(f"({math.ceil(n / args.batch_size)} steps per epoch)")
    print("\n".join(notes))


if __name__ == "__main__":
    main()
