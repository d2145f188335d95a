"""Extraction: `offroad-seg extract` vs. pure backbone forward vs. a naive loop.

    python bench/bench_extract.py [--images 32 | --data DIR] [--device cpu] [--batch-size 8]

  pure     backbone forward (normalise + DINOv2, as `Backbone.encode`) on resized uint8 images
           held in device memory (pinned host memory when they would take over a quarter of
           the free GPU memory), same batch size
  extract  the real command: decode in workers, preprocess, backbone, compress and write
  naive    one image at a time, no workers, fp32 on the device, synchronous fp32 zarr writes
Key ratio: extract / pure (1.0 means decoding and writing are completely hidden).
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import torch
import zarr
from common import base_parser, machine, resident, setup, sync, table

from offroad_seg.data.dataset import list_samples
from offroad_seg.data.images import read_image
from offroad_seg.features.extract import ExtractConfig, extract
from offroad_seg.features.loader import default_batch_size
from offroad_seg.models.backbone import load_backbone
from offroad_seg.models.preprocess import (
    Preprocessing,
    image_to_tensor,
    parse_size,
    preprocess,
    resize_image,
)


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 CPU, 64 GPU")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--naive-images", type=int, default=8, help="images for the naive loop")
    p.add_argument("--repeat", type=int, default=2, help="best of N for pure and extract")
    args = p.parse_args()
    data, device = setup(args)
    args.batch_size = args.batch_size or default_batch_size(device)
    samples = list_samples(data)
    n = len(samples)
    prep = Preprocessing(size=parse_size(args.size))
    backbone = load_backbone(args.weights, device=device)

    # pure: resized uint8 images (a quarter of float32's memory) on the device when they fit
    x = torch.cat([resize_image(image_to_tensor(read_image(s.image)), prep) for s in samples])
    x = resident(x, device)
    bs = args.batch_size

    def pure_pass() -> float:
        sync(device)
        t = time.perf_counter()
        for s in range(0, n, bs):
            backbone.encode(x[s : s + bs], prep).to(torch.float16)
        sync(device)
        return time.perf_counter() - t

    def extract_pass():
        cache = args.workdir / "bench-extract.zarr"
        shutil.rmtree(cache, ignore_errors=True)
        config = ExtractConfig(
            data_dir=data,
            cache=cache,
            weights=args.weights,
            size=prep.size,
            device=str(device),
            batch_size=bs,
            workers=args.workers,
            progress=False,
        )
        return extract(config)

    backbone.encode(x[:bs], prep)  # warm-up
    # alternate the two so that machine noise hits both alike; best of each
    pures, runs = [], []
    for _ in range(args.repeat):
        pures.append(pure_pass())
        runs.append(extract_pass())
    pure = min(pures)
    summary = min(runs, key=lambda r: r.seconds)
    ext = summary.seconds

    # naive: one image at a time, fp32, no workers, synchronous writes
    m = min(n, args.naive_images)
    naive_path = args.workdir / "bench-naive.zarr"
    shutil.rmtree(naive_path, ignore_errors=True)
    arr = zarr.create_array(
        str(naive_path), shape=(m, 384, *prep.grid), chunks=(1, 384, *prep.grid), dtype="float32"
    )
    t = time.perf_counter()
    for i, s in enumerate(samples[:m]):
        xi = preprocess(image_to_tensor(read_image(s.image)), prep).to(device)
        with torch.no_grad():
            arr[i] = backbone(xi)[0].cpu().numpy().astype(np.float32)
    sync(device)
    naive = (time.perf_counter() - t) / m * n

    rows = [
        ("pure backbone forward", f"{n / pure:.2f}", "1.00"),
        ("extract (command)", f"{n / ext:.2f}", f"{pure / ext:.2f}"),
        ("naive loop", f"{n / naive:.2f}", f"{pure / naive:.2f}"),
    ]
    print(f"extraction, {n} images at {prep.size[0]}x{prep.size[1]}, batch {bs}, {device}")
    print(f"machine: {machine(device)}")
    print(table(rows, ("path", "images/s", "vs pure")))
    print(f"cache: {summary.bytes_on_disk / n / 1e3:.0f} kB/image")
    print(f"extract / pure throughput: {pure / ext:.2f}; extract / naive: {naive / ext:.2f}")


if __name__ == "__main__":
    main()
