"""`offroad-seg cache info`: what a cache holds (images, views, its arrays' shapes, dtypes and
chunking, format version and shards), its size on disk and compression ratio, backbone, the
whole preprocessing, classes and fingerprints, as one JSON-serialisable dict."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from offroad_seg.features.cache_format import HACKATHON, SCALES

if TYPE_CHECKING:
    from offroad_seg.features.cache import FeatureCache


def cache_info(cache: FeatureCache) -> dict[str, Any]:
    """Summary of a cache for `cache info` (JSON-serialisable)."""
    done = int(cache.done().sum())
    features = cache.array("features")
    stored = cache.bytes_on_disk()
    raw = features.nbytes + cache.array("labels").nbytes
    if cache.spec.quantized:
        raw += cache.array(SCALES).nbytes
    hackathon = cache.array(HACKATHON) if cache.has_hackathon_labels else None
    if hackathon is not None:
        raw += hackathon.nbytes
    prep = cache.spec.preprocessing
    return {
        "path": cache.path,
        "complete": cache.complete,
        "images": cache.num_images,
        "done": done,
        "views": list(cache.spec.views),
        "features": {
            "shape": list(features.shape),
            "dtype": cache.spec.dtype,
            "chunks": list(features.chunks),
            "shards": None if features.shards is None else list(features.shards),
            **({"scales": list(cache.array(SCALES).shape)} if cache.spec.quantized else {}),
        },
        "labels": {"shape": list(cache.array("labels").shape), "dtype": "uint8"},
        # None: a cache written before the protocol's labels were stored
        "hackathon_labels": {"shape": list(hackathon.shape), "dtype": "uint8"}
        if hackathon is not None
        else None,
        "images_per_chunk": cache.images_per_chunk,
        "version": cache.spec.version,
        "chunks_per_shard": cache.spec.chunks_per_shard,
        "bytes_on_disk": stored,
        "bytes_per_image": stored / max(1, done) if done else None,
        "compression_ratio": raw * done / cache.num_images / stored if done else None,
        "backbone": cache.spec.backbone.to_dict(),
        "block": _block(cache),
        "preprocessing": {**prep.to_dict(), "grid": list(prep.grid)},
        "classes": cache.spec.class_map.names,
        "compat_fingerprint": cache.spec.compat_fingerprint,
        "fingerprint": cache.spec.fingerprint,
    }


def _block(cache: FeatureCache) -> str | None:
    """What a block cache holds, in words; None for a cache of final features."""
    bb = cache.spec.backbone
    if bb.block is None:
        return None
    tokens = cache.spec.feature_shape[-1]
    return (
        f"tokens entering block {bb.block} of {bb.variant.depth} ({tokens} tokens: "
        f"{bb.variant.prefix_tokens} prefix + patches, before the final norm); train runs "
        f"blocks {bb.block}..{bb.variant.depth - 1}"
    )
