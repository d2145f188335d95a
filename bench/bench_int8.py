"""int8 versus float16 caches: bytes per image, feature error, codecs and head quality.

    python bench/bench_int8.py [--images 32 --val 8 | --data TRAIN --val-data VAL]
        [--layers 1,4] [--seeds 0,1,2] [--epochs 20]

Extracts the same split twice per `--layers` setting (float16 and int8, the same backbone),
then prints (1) bytes per image on disk, (2) the relative error of the int8 features against
the float16 ones (over the whole cache, and the worst token), (3) blosc codecs measured on the
int8 feature chunks, and (4) the validation mIoU of the default head trained on each cache with
several seeds (mean and spread), the question being whether int8 changes quality.
"""

from __future__ import annotations

import logging
import statistics

import numcodecs
import numpy as np
from bench_cache import codec_rows
from common import base_parser, ensure_cache, machine, setup, table, validation_data

from offroad_seg.features.cache import FeatureCache
from offroad_seg.training.loop import TrainConfig, train


def int8_codecs(chunks: list[np.ndarray]) -> list[tuple]:
    b = numcodecs.Blosc
    candidates = {
        "blosc lz4 noshuffle": b("lz4", 5, b.NOSHUFFLE),
        "blosc lz4 bitshuffle": b("lz4", 5, b.BITSHUFFLE),
        "blosc zstd-1 noshuffle": b("zstd", 1, b.NOSHUFFLE),
        "blosc zstd-1 bitshuffle": b("zstd", 1, b.BITSHUFFLE),
        "blosc zstd-3 noshuffle": b("zstd", 3, b.NOSHUFFLE),
    }
    return codec_rows(chunks, candidates)


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--val", type=int, default=8, help="synthetic validation images")
    p.add_argument("--val-data", help="a validation dataset folder (with --data)")
    p.add_argument("--layers", default="1,4")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=20)
    args = p.parse_args()
    data, device = setup(args)
    val_data = validation_data(args)
    logging.getLogger("offroad_seg").setLevel(logging.WARNING)
    size_rows, error_rows, quality_rows = [], [], []
    codecs = None
    for layers in (int(v) for v in args.layers.split(",")):
        caches = {}
        for dtype in ("float16", "int8"):
            tag = f"L{layers}-{dtype}"
            caches[dtype] = (
                ensure_cache(data, args.workdir / f"int8-{tag}-train.zarr", args, layers=layers,
                             dtype=dtype),
                ensure_cache(val_data, args.workdir / f"int8-{tag}-val.zarr", args, layers=layers,
                             dtype=dtype),
            )  # fmt: skip
            cache = FeatureCache.open(caches[dtype][0])
            size_rows.append(
                (f"layers {layers}", dtype, f"{cache.bytes_on_disk() / cache.num_images / 1e3:.0f}")
            )
        fp16, _ = FeatureCache.open(caches["float16"][0]).load()
        int8_cache = FeatureCache.open(caches["int8"][0])
        deq, _ = int8_cache.load()
        ref = fp16.astype(np.float32)
        err = deq - ref
        token_err = np.linalg.norm(err, axis=2) / np.maximum(np.linalg.norm(ref, axis=2), 1e-12)
        error_rows.append(
            (
                f"layers {layers}",
                f"{np.linalg.norm(err) / np.linalg.norm(ref):.4%}",
                f"{np.median(token_err):.4%}",
                f"{token_err.max():.4%}",
            )
        )
        if codecs is None:
            chunks = [int8_cache.array("features")[slice(*int8_cache.chunk_range(k))]
                      for k in range(min(int8_cache.num_chunks, 16))]  # fmt: skip
            codecs = int8_codecs(chunks)
        for dtype, (train_cache, val_cache) in caches.items():
            scores, seconds = [], []
            for seed in (int(s) for s in args.seeds.split(",")):
                out = args.workdir / f"int8-run-L{layers}-{dtype}-s{seed}"
                result = train(
                    TrainConfig(
                        caches=(train_cache,),
                        out=out,
                        val_cache=val_cache,
                        epochs=args.epochs,
                        seed=seed,
                        device=str(device),
                        progress=False,
                        overwrite=True,
                    )
                )
                scores.append(result.best["val_miou"])
                seconds.append(result.seconds)
            quality_rows.append(
                (
                    f"layers {layers}",
                    dtype,
                    " ".join(f"{s:.4f}" for s in scores),
                    f"{statistics.mean(scores):.4f}",
                    f"{statistics.stdev(scores) if len(scores) > 1 else 0:.4f}",
                    f"{statistics.mean(seconds):.1f}",
                )
            )
    print(f"\n{machine(device)}; train {data}, val {val_data}\n")
    print(table(size_rows, ("features", "dtype", "kB/image on disk")))
    print()
    print(table(error_rows, ("features", "rel. error (cache)", "median token", "worst token")))
    print()
    print(table(codecs, ("int8 codec", "ratio", "encode MB/s", "decode MB/s")))
    print()
    header = ("features", "dtype", "val mIoU per seed", "mean", "std", "s/run")
    print(table(quality_rows, header))


if __name__ == "__main__":
    main()
