"""Backbone x input size: compute, cache size and measured speed, to choose before spending GPU
hours.

    python bench/bench_backbones.py [--sizes 266x476,378x672,532x952]
        [--sizes-dinov3 272x480,384x672,528x960] [--family dinov2,dinov3] [--device cpu]
        [--speed dinov2_vits14,dinov2_vitb14,dinov2_vitl14] [--images 2]

For each variant (the DINOv2 plain and register variants cost the same, to 0.1%) and working
size of its family (multiples of its patch: 14 for DINOv2, 16 for DINOv3) it prints: the token
grid, GFLOP per image (a multiply-add counts two, torch's FlopCounterMode on the meta device,
attention included), the cache's feature bytes per image before compression for `--layers 1`
and `--layers 4` in float16 and int8 (scales included), and the measured images/s of the
backbone alone (random weights: speed does not depend on them) for the variants
named in `--speed`. The rest print '-': ViT-g at 532x952 takes minutes per image on a laptop CPU.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from common import machine, sync, table
from torch.utils.flop_counter import FlopCounterMode

from offroad_seg.core.runtime import resolve_device
from offroad_seg.models.backbone import Backbone, BackboneSpec, create_vit
from offroad_seg.models.preprocess import parse_size
from offroad_seg.models.variants import BACKBONES


def gflops(variant, size: tuple[int, int]) -> float:
    with torch.device("meta"):
        backbone = Backbone(create_vit(variant), BackboneSpec("0" * 64, "meta", 1, variant.name))
        x = torch.zeros(1, 3, *size)
        with FlopCounterMode(display=False) as counter:
            backbone(x)
    return counter.get_total_flops() / 1e9


def cache_mb(variant, size: tuple[int, int], layers: int, dtype: str) -> float:
    h, w = size[0] // variant.patch_size, size[1] // variant.patch_size
    c = variant.embed_dim * layers
    if dtype == "int8":
        return (c * h * w + 4 * layers * h * w) / 1e6
    return 2 * c * h * w / 1e6


def images_per_s(variant, size, device, images: int) -> float:
    torch.manual_seed(0)
    vit = create_vit(variant)
    backbone = Backbone(vit, BackboneSpec("0" * 64, "random", 1, variant.name)).to(device)
    x = torch.randn(1, 3, *size, device=device)
    from offroad_seg.core.runtime import autocast

    with autocast(device):
        backbone(x)  # warm-up
        sync(device)
        start = time.perf_counter()
        for _ in range(images):
            backbone(x)
        sync(device)
    return images / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="266x476,378x672,532x952", help="DINOv2 sizes")
    p.add_argument("--sizes-dinov3", default="272x480,384x672,528x960", help="DINOv3 sizes")
    p.add_argument("--family", default="dinov2,dinov3", help="families to list")
    p.add_argument("--speed", default="dinov2_vits14,dinov2_vitb14,dinov2_vitl14")
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=2, help="timed images per measurement")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    sizes = {
        "dinov2": [parse_size(s) for s in args.sizes.split(",")],
        "dinov3": [parse_size(s) for s in args.sizes_dinov3.split(",")],
    }
    families = set(args.family.split(","))
    timed = set(args.speed.split(",")) if args.speed else set()
    rows = []
    for variant in BACKBONES.values():
        if variant.family not in families or (variant.family == "dinov2" and variant.registers):
            continue  # DINOv2's register variants cost the same as the plain ones
        p = variant.patch_size
        for size in sizes[variant.family]:
            speed = "-"
            if variant.name in timed:
                speed = f"{images_per_s(variant, size, device, args.images):.2f}"
            rows.append(
                (
                    variant.name,
                    f"{size[0]}x{size[1]}",
                    f"{size[0] // p}x{size[1] // p}",
                    f"{gflops(variant, size):.0f}",
                    f"{cache_mb(variant, size, 1, 'float16'):.2f}",
                    f"{cache_mb(variant, size, 1, 'int8'):.2f}",
                    f"{cache_mb(variant, size, 4, 'float16'):.2f}",
                    f"{cache_mb(variant, size, 4, 'int8'):.2f}",
                    speed,
                )
            )
            print(table(rows[-1:], HEADER).splitlines()[-1], flush=True)
    print(f"\n{machine(device)}\n")
    print(table(rows, HEADER))


HEADER = (
    "backbone",
    "size",
    "tokens",
    "GFLOP/img",
    "MB/img L1 fp16",
    "L1 int8",
    "L4 fp16",
    "L4 int8",
    "images/s",
)

if __name__ == "__main__":
    main()
