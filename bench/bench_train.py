"""Head retraining: a cached epoch vs. the seed's online epoch vs. pure head compute.

    python bench/bench_train.py [--images 32 | --data DIR] [--head NAME] [--device cpu]

Three ways to run one epoch of the same head over the same images at the same batch size:
  online   the seed's loop: decode + preprocess + backbone + head step, every step
  cached   `offroad-seg train` on the feature cache (what users run)
  pure     the same steps on features and labels already in memory, as stored (float16 and
           uint8; on the GPU when they take at most a quarter of its free memory, else pinned
           host memory), made float32/long per batch as `train` does
The key ratios: online / cached (the reason the cache exists) and cached / pure (the cache's
own overhead; 1.0 means free).
"""

from __future__ import annotations

import math
import shutil
import statistics
import time

import torch
from common import base_parser, ensure_cache, machine, resident, setup, sync, table

from offroad_seg.config import default
from offroad_seg.core.runtime import autocast
from offroad_seg.data.classes import ClassMap
from offroad_seg.data.dataset import list_samples
from offroad_seg.features.cache import FeatureCache
from offroad_seg.features.loader import DecodedSamples, DecodeOptions, default_workers, make_loader
from offroad_seg.models.backbone import load_backbone
from offroad_seg.models.heads import HeadConfig, build_head, head_choices
from offroad_seg.models.preprocess import Preprocessing, parse_size
from offroad_seg.training.loop import TrainConfig, make_optimizer, train
from offroad_seg.training.losses import class_weights_from_pixels, segmentation_loss


def online_epoch(data, args, device, head_cfg, weight) -> float:
    """The seed's loop: the backbone runs on every image of every epoch."""
    prep = Preprocessing(size=parse_size(args.size))
    backbone = load_backbone(args.weights, device=device)
    samples = list_samples(data)
    opts = DecodeOptions(prep=prep, class_map=ClassMap.default())
    loader = make_loader(
        DecodedSamples(samples, opts), args.batch_size, default_workers(device), device
    )
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
    p.add_argument("--head", default=default(TrainConfig, "head"), choices=head_choices())
    p.add_argument("--batch-size", type=int, default=2, help="the seed trained with batch 2")
    p.add_argument("--epochs", type=int, default=5, help="cached/pure epochs (median taken)")
    p.add_argument("--skip-online", action="store_true")
    args = p.parse_args()
    data, device = setup(args)
    cache_path = ensure_cache(data, args.workdir / f"{data.name}-{args.size}.zarr", args)
    cache = FeatureCache.open(cache_path)
    n = cache.num_images
    head_cfg = HeadConfig(name=args.head, in_channels=cache.channels, num_classes=11)
    weight = torch.tensor(class_weights_from_pixels(cache.class_pixels()), dtype=torch.float32)
    weight = weight.to(device)

    out = args.workdir / "train-run"
    shutil.rmtree(out, ignore_errors=True)
    result = train(
        TrainConfig(
            caches=(cache_path,),
            out=out,
            head=args.head,
            epochs=args.epochs,
            batch_size=args.batch_size,
            device=str(device),
            progress=False,
        )
    )
    epoch_times = [r["seconds"] for r in result.history]
    cached = statistics.median(epoch_times[1:] if len(epoch_times) > 1 else epoch_times)
    pure = pure_epoch(cache, args, device, head_cfg, weight, args.epochs)
    online = None if args.skip_online else online_epoch(data, args, device, head_cfg, weight)

    rows = []
    if online is not None:
        rows.append(("online (seed loop)", f"{online:.3f}", f"{n / online:.1f}", "1.0x"))
    speed = (lambda s: f"{online / s:.1f}x") if online else (lambda s: "-")
    rows.append((f"cached ({result.source})", f"{cached:.3f}", f"{n / cached:.1f}", speed(cached)))
    rows.append(("pure head compute", f"{pure:.3f}", f"{n / pure:.1f}", speed(pure)))
    print(f"head retraining, {n} images, head {args.head}, batch {args.batch_size}, {device}")
    print(f"machine: {machine(device)}")
    print(table(rows, ("epoch", "seconds", "images/s", "vs online")))
    if online is not None:
        print(f"cached epoch speed-up over online: {online / cached:.1f}x")
    print(f"cache overhead (cached / pure): {cached / pure:.2f}")
    steps = math.ceil(n / args.batch_size)
    print(f"({steps} steps per epoch; cached epochs {', '.join(f'{t:.3f}' for t in epoch_times)})")


if __name__ == "__main__":
    main()
