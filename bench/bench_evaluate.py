"""Evaluation: `offroad-seg evaluate` (with and without writing outputs) vs. pure forward.

    python bench/bench_evaluate.py [--images 32 | --data DIR] [--device cpu] [--batch-size 8]

  pure       backbone + head forward on resized uint8 images in device memory (pinned host
             memory when they would take over a quarter of the free GPU memory)
  metrics    evaluate without writing masks or panels (decode, forward, full-size metrics)
  masks      evaluate writing masks/ and masks_color/ (no comparison panels)
Key ratios: metrics / pure and masks / pure (1.0 means all the rest is hidden).
"""

from __future__ import annotations

import shutil
import time

import torch
from common import base_parser, ensure_cache, machine, resident, setup, sync, table

from offroad_seg.core.runtime import autocast
from offroad_seg.data.dataset import list_samples
from offroad_seg.data.images import read_image
from offroad_seg.features.loader import default_batch_size
from offroad_seg.inference.evaluate import EvalConfig, evaluate
from offroad_seg.models.backbone import load_backbone
from offroad_seg.models.checkpoint import load_checkpoint
from offroad_seg.models.preprocess import image_to_tensor, resize_image
from offroad_seg.training.loop import TrainConfig, train


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 CPU, 64 GPU")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--repeat", type=int, default=2, help="best of N for each path")
    args = p.parse_args()
    data, device = setup(args)
    args.batch_size = args.batch_size or default_batch_size(device)
    cache = ensure_cache(data, args.workdir / f"{data.name}-{args.size}.zarr", args)
    run = args.workdir / "eval-head"
    if not (run / "segmentation_head.pth").exists():
        shutil.rmtree(run, ignore_errors=True)
        train(TrainConfig(caches=(cache,), out=run, epochs=1, progress=False, device=str(device)))
    head_path = run / "segmentation_head.pth"
    ckpt = load_checkpoint(head_path)
    head = ckpt.build(device)
    backbone = load_backbone(args.weights, device=device)
    samples = list_samples(data)
    n = len(samples)
    bs = args.batch_size
    prep = ckpt.preprocessing
    x = torch.cat([resize_image(image_to_tensor(read_image(s.image)), prep) for s in samples])
    x = resident(x, device)

    def pure_pass() -> float:
        sync(device)
        t = time.perf_counter()
        for s in range(0, n, bs):
            feats = backbone.encode(x[s : s + bs], prep)
            with torch.no_grad(), autocast(device):
                head(feats)
        sync(device)
        return time.perf_counter() - t

    def eval_pass(write_masks: bool) -> float:
        out = args.workdir / "bench-eval"
        shutil.rmtree(out, ignore_errors=True)
        result = evaluate(
            EvalConfig(
                head=head_path,
                data_dir=data,
                out=out,
                weights=args.weights,
                batch_size=bs,
                workers=args.workers,
                device=str(device),
                comparisons=0,
                write_masks=write_masks,
                progress=False,
            )
        )
        return result.seconds

    pure_pass()  # warm-up
    pures, metrics_only, masks = [], [], []
    for _ in range(args.repeat):
        pures.append(pure_pass())
        metrics_only.append(eval_pass(False))
        masks.append(eval_pass(True))
    pure, m, w = min(pures), min(metrics_only), min(masks)
    rows = [
        ("pure forward (backbone + head)", f"{n / pure:.2f}", "1.00"),
        ("evaluate, metrics only", f"{n / m:.2f}", f"{pure / m:.2f}"),
        ("evaluate, writing masks", f"{n / w:.2f}", f"{pure / w:.2f}"),
    ]
    print(f"evaluation, {n} images, batch {bs}, {device}")
    print(f"machine: {machine(device)}")
    print(table(rows, ("path", "images/s", "vs pure")))
    print(f"evaluate / pure throughput: {pure / m:.2f} (metrics only), {pure / w:.2f} (masks)")


if __name__ == "__main__":
    main()
