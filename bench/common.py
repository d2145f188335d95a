"""Shared set-up for the benchmark scripts: a dataset (synthetic or real) and its caches."""

from __future__ import annotations

import argparse
import logging
import platform
from datetime import date
from pathlib import Path

import torch

from offroad_seg.extract import ExtractConfig, extract
from offroad_seg.synthetic import write_split


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", type=Path, help="a dataset folder (Color_Images/, Segmentation/)")
    p.add_argument("--images", type=int, default=32, help="synthetic images when no --data")
    p.add_argument("--workdir", type=Path, default=Path("runs/bench"), help="scratch folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", default="random")
    p.add_argument("--size", default="266x476")
    return p


def setup(args) -> tuple[Path, torch.device]:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from offroad_seg.runtime import resolve_device

    device = resolve_device(args.device)
    if args.data is not None:
        return args.data, device
    data = args.workdir / f"synth{args.images}"
    if not (data / "Segmentation").is_dir():
        write_split(data, args.images, seed=0)
    return data, device


def ensure_cache(data: Path, cache: Path, args, **kw) -> Path:
    from offroad_seg.preprocess import parse_size

    if not (cache / "zarr.json").exists():
        extract(
            ExtractConfig(
                data_dir=data,
                cache=cache,
                weights=args.weights,
                size=parse_size(args.size),
                device=args.device,
                progress=False,
                **kw,
            )
        )
    return cache


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall times measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"{what}; torch {torch.__version__}; {date.today()}"


def table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format(*header), line.format(*("-" * w for w in widths))]
    out += [line.format(*(str(c) for c in r)) for r in rows]
    return "\n".join(out)
