"""Cache format 1 vs 2 (chunks packed in shards): files, write rate, random reads, streaming.

For each layout (format 1; format 2 at each --chunks-per-shard) a cache of N random images at
a tiny working size (56x56: 4x4 ViT-S tokens, ~1 MiB feature chunks of 85 images) is written
as extract writes (whole units), then measured: files per 10k images, images/s written,
random single-image reads per second (local disk, and with --s3 the moto S3 server on
loopback), and images/s delivered by the streaming source (`StreamingSource`, one epoch)
against the rate a head trains at on this machine's CPU (ratio > 1: the head never waits).

    python bench/bench_shards.py --images 20000 --chunks-per-shard 16 64 --s3
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import random_cache

from offroad_seg.features.cache import FeatureCache
from offroad_seg.training.sources import StreamingSource

SIZE = (56, 56)


def files_under(path: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def random_reads(cache: FeatureCache, count: int, seed: int = 0) -> float:
    """Single images read at random positions, per second (a fresh open: no warm arrays)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, cache.num_images, count)
    start = time.perf_counter()
    for i in picks:
        cache.read_images_stored(np.array([i]))
    return count / (time.perf_counter() - start)


def stream_rate(cache: FeatureCache, batch: int, window: int) -> float:
    source = StreamingSource([cache], torch.device("cpu"), window=window)
    start = time.perf_counter()
    n = sum(len(lab) for _, lab in source.batches(0, 0, batch))
    return n / (time.perf_counter() - start)


def head_rate(cache: FeatureCache, batch: int, steps: int = 30) -> float:
    """Images/s the default head trains at on this CPU: forward, loss, backward and step on
    a batch already in memory (what `train` does per batch, without the data)."""
    from offroad_seg.models.heads import HeadConfig, build_head
    from offroad_seg.training.loop import make_optimizer
    from offroad_seg.training.losses import segmentation_loss

    f, lab = cache.read_images(np.arange(batch))
    x = torch.from_numpy(f[:, 0].astype(np.float32))
    y = torch.from_numpy(lab[:, 0].astype(np.int64))
    torch.manual_seed(0)
    head = build_head(HeadConfig(in_channels=cache.channels, num_classes=11))
    opt = make_optimizer(head, 3e-4, 0.01)
    start = time.perf_counter()
    for _ in range(steps):
        loss = segmentation_loss(head(x), y, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def _shown(key: str, value) -> str:
    return f"{key}={value:.1f}" if isinstance(value, float) else f"{key}={value}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_copy(local: Path, name: str, endpoint: str) -> str:
    """The cache uploaded to the moto server's bucket; its URL."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.put(str(local), f"bench/{name}", recursive=True)
    return f"s3://bench/{name}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--chunks-per-shard", type=int, nargs="+", default=[16, 64])
    p.add_argument("--reads", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--s3", action="store_true", help="also read from moto's S3 server")
    p.add_argument("--dir", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="bench_shards_", dir=args.dir))
    server = None
    if args.s3:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update(
            AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x", AWS_ENDPOINT_URL=endpoint
        )
        import s3fs

        s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir("bench")
    layouts = [(1, 1), *((2, c) for c in args.chunks_per_shard)]
    try:
        rows = []
        for version, cps in layouts:
            name = f"v{version}" + (f"-{cps}" if version == 2 else "")
            path = root / f"{name}.zarr"
            start = time.perf_counter()
            random_cache(path, args.images, SIZE, version=version, chunks_per_shard=cps)
            write = args.images / (time.perf_counter() - start)
            files = files_under(path)
            cache = FeatureCache.open(path)
            row = {
                "layout": name,
                "files": files,
                "files/10k": files * 10000 / args.images,
                "write img/s": write,
                "random read img/s": random_reads(cache, args.reads),
                "stream img/s": stream_rate(cache, args.batch, args.window),
            }
            if server is not None:
                url = s3_copy(path, name, os.environ["AWS_ENDPOINT_URL"])
                remote = FeatureCache.open(url)
                row["S3 random read img/s"] = random_reads(remote, max(20, args.reads // 5))
                row["S3 stream img/s"] = stream_rate(remote, args.batch, args.window)
            rows.append(row)
            print("  ".join(_shown(k, v) for k, v in row.items()), flush=True)
            cache = FeatureCache.open(path)
        head = head_rate(cache, args.batch)
        print(f"head (upnext, batch {args.batch}) trains at {head:.1f} img/s on this CPU")
        for row in rows:
            ratios = [f"{k.split()[0]} {row[k] / head:.1f}x" for k in row if "stream" in k]
            print(f"{row['layout']}: streaming / head = {', '.join(ratios)}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
