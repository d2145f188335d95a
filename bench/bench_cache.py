"""Cache: bytes per image, compression ratio, codec choice, and read throughput.

    python bench/bench_cache.py [--images 32 | --data DIR] [--cache PATH]

Prints (1) the cache's size on disk per image and its compression ratio, (2) candidate codecs
measured on the cache's own feature chunks (ratio, encode and decode MB/s), and (3) read
throughput of the two stage-2 readers: whole cache into memory, and chunk-by-chunk streaming.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import numcodecs
import numpy as np
import torch
from common import base_parser, ensure_cache, setup, table

from offroad_seg.features.cache import FeatureCache
from offroad_seg.training.sources import StreamingSource


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def codec_rows(chunks: list[np.ndarray], candidates: dict | None = None) -> list[tuple]:
    """(name, ratio, encode MB/s, decode MB/s) of each codec on the chunks, best of 5."""
    raw = sum(c.nbytes for c in chunks)
    b = numcodecs.Blosc
    candidates = candidates or {
        "none": None,
        "blosc lz4 shuffle": b("lz4", 5, b.SHUFFLE),
        "blosc lz4 bitshuffle (used)": b("lz4", 5, b.BITSHUFFLE),
        "blosc zstd-1 bitshuffle": b("zstd", 1, b.BITSHUFFLE),
        "blosc zstd-3 shuffle": b("zstd", 3, b.SHUFFLE),
        "blosc zstd-3 bitshuffle": b("zstd", 3, b.BITSHUFFLE),
        "blosc zstd-5 bitshuffle": b("zstd", 5, b.BITSHUFFLE),
    }
    rows = []
    for name, codec in candidates.items():
        if codec is None:
            rows.append((name, "1.00", "-", "-"))
            continue
        enc = dec = float("inf")
        for _ in range(5):  # best of 5: codec timings are short and noisy
            t = time.perf_counter()
            encoded = [codec.encode(c) for c in chunks]
            enc = min(enc, time.perf_counter() - t)
            t = time.perf_counter()
            for e in encoded:
                codec.decode(e)
            dec = min(dec, time.perf_counter() - t)
        size = sum(len(e) for e in encoded)
        rows.append((name, f"{raw / size:.3f}", f"{raw / enc / 1e6:.0f}", f"{raw / dec / 1e6:.0f}"))
    return rows


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--cache", type=Path, help="an existing cache to measure")
    p.add_argument("--window", type=int, default=16, help="streaming window, in chunks")
    args = p.parse_args()
    if args.cache is None:
        data, _ = setup(args)
        args.cache = ensure_cache(data, args.workdir / f"{data.name}-{args.size}.zarr", args)
    cache = FeatureCache.open(args.cache)
    info = cache.info()
    n = cache.num_images
    raw = (cache.array("features").nbytes + cache.array("labels").nbytes) / n
    print(f"cache {args.cache}: {n} images, views {info['views']}, features {info['features']}")
    disk = info["bytes_on_disk"]
    print(
        f"on disk: {disk / 1e6:.2f} MB, {disk / n / 1e3:.0f} kB/image"
        f" (features+labels raw {raw / 1e3:.0f} kB/image), "
        f"compression ratio {info['compression_ratio']:.2f}"
    )

    chunks = [cache.read_chunk(k)[0] for k in range(min(cache.num_chunks, 16))]
    print("\nfeature codecs on this cache's chunks (ratio = raw / compressed):")
    print(table(codec_rows(chunks), ("codec", "ratio", "encode MB/s", "decode MB/s")))

    # streaming first: ru_maxrss is a high-water mark, so measure it before loading everything
    rss0 = peak_rss()
    source = StreamingSource([cache], torch.device("cpu"), window=args.window)
    t = time.perf_counter()
    total = 0
    for f, lab in source.batches(seed=0, epoch=1, batch_size=8):
        total += f.numel() * cache.array("features").dtype.itemsize + lab.numel()
    stream = time.perf_counter() - t
    stream_rss = peak_rss() - rss0

    t = time.perf_counter()
    feats, labels = cache.load()
    load = time.perf_counter() - t
    size = feats.nbytes + labels.nbytes
    rows = [
        ("load into memory", f"{size / load / 1e6:.0f}", f"{n / load:.0f}", f"{size / 1e6:.0f}"),
        (
            f"stream (window {args.window} chunks)",
            f"{total / stream / 1e6:.0f}",
            f"{n / stream:.0f}",
            f"{stream_rss / 1e6:.0f}",
        ),
    ]
    print("\nread throughput (decompressed bytes; one view per image when streaming):")
    print(table(rows, ("reader", "MB/s", "images/s", "memory MB")))
    print(
        f"streaming peak RSS growth: {stream_rss / 1e6:.0f} MB for a {raw * n / 1e6:.0f} MB cache"
    )


if __name__ == "__main__":
    main()
