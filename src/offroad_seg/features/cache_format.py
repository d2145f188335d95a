"""The feature cache's format: one zarr v3 group per dataset split (format version 2; 1 is read).

Arrays (N images, V views, C channels, h x w tokens, H x W working size, K classes; a block
cache, `extract --block B`, stores each view's whole token sequence entering block B as C x 1 x T,
T = prefix + h*w tokens, with L = 1: `CacheSpec.feature_shape`):

    features      (N, V, C, h, w)  float16, float32 or int8  chunks (k, 1, C, h, w)
    scales        (N, V, L, h, w)  float32 (int8 only)     chunks (k, 1, L, h, w)  per token, layer
    hackathon_labels (N, 266, 476) uint8 (0.2 on)          chunks (k, 266, 476)  protocol ids
                                     (older caches: (N, H, W), at the working size)
    labels        (N, V, H, W)     uint8, 255 = ignore    chunks (k, 1, H, W)
    done          (N,)             bool                   chunks (k,)   set after a chunk's data
    chunk_checksums (N/k, S)       uint32 (0.3 on)        chunks (1, S) each data chunk's crc32c
    names         (N,)             string                 file names, in order
    class_pixels  (K,)             int64                  view-0 label histogram (when complete)

Every chunk is Blosc-compressed (features lz4 + bit shuffle, labels zstd) and carries a crc32c
checksum. Format 1 stores each chunk in its own file (key `features/c/i/v/0/0/0`). Format 2
packs `chunks_per_shard` consecutive chunks of an array (along the image axis) into one shard
file with zarr's sharding codec (key `features/c.s.v.0.0.0`, an index of the inner chunks at its
end): the same chunks, the same bytes per chunk, about `chunks_per_shard` times fewer files.
`names` and `class_pixels` are one chunk each in both. A writer owns whole write units -- a
chunk in format 1, a shard in format 2, each of k images (k x chunks_per_shard) of every view --
which is what makes resume and concurrent writers safe (zarr rewrites a whole shard on any
write, so two writers of one shard would lose data: zarr issue #3682). The group's attributes
describe the backbone, preprocessing, class map and views, with a `fingerprint` over all of it
plus the file list, and `compat_fingerprint` over the parts that decide whether features from
two caches can be mixed (backbone, preprocessing, class map); `version` and `chunks_per_shard`
(the layout, not the content) are outside it.

This module holds the format's constants, its arrays' layout and codecs (`create_arrays`,
`compressors`), `CacheSpec` (what determines a cache's content; the group's attributes) and
`StoredFeatures` (features as stored). `FeatureCache` (cache.py) reads and writes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
import zarr.codecs

from offroad_seg.config import CACHE_VERSION
from offroad_seg.data.classes import IGNORE_ID, ClassMap
from offroad_seg.data.digest import SOURCES_METHOD, digest
from offroad_seg.errors import CacheError
from offroad_seg.features.quantize import dequantize
from offroad_seg.metrics.hackathon import HACKATHON_SIZE
from offroad_seg.models.backbone import BackboneSpec
from offroad_seg.models.fingerprint import compat_differences, compat_fingerprint
from offroad_seg.models.preprocess import Preprocessing

FORMAT = "offroad-seg-cache"
VERSIONS = (1, 2)  # the formats this tool reads; it writes CACHE_VERSION (config.py)
VIEWS = ("identity", "hflip")
FEATURE_DTYPES = ("float16", "float32", "int8")
TARGET_CHUNK_BYTES = 1 << 20
# Format 2: feature bytes per shard when chunks_per_shard is 0 (chosen by bench_shards.py; see
# docs/data-and-cache.md): 64 chunks of ~1 MiB
TARGET_SHARD_BYTES = 64 << 20
# the key encoding of sharded arrays: "c.s.v.0.0.0", never a key of format 1 ("c/i/v/0/0/0"),
# so `cache migrate` writes the shards beside the chunks they replace
SHARD_KEY_ENCODING = {"name": "default", "separator": "."}
ARRAYS = ("features", "labels", "done", "names", "class_pixels")
SCALES = "scales"  # int8 caches only: the per-token, per-layer scales (see quantize.py)
# View 0's labels as the hackathon protocol scores them (metrics.hackathon_truth), so training's
# validation can report it too; caches written before 0.2 lack it.
HACKATHON = "hackathon_labels"
# Per data chunk, the crc32c that ends each of its stored chunks (features, labels, scales of
# every view, hackathon labels; `FeatureCache.chunk_coords` order), recorded when it is
# committed: a chunk's own checksum proves its bytes whole, this row proves they are the ones
# written at that position (two chunks swapped on disk each still pass their own checksum).
# Caches written before 0.3 lack it.
CHECKSUMS = "chunk_checksums"
# Written by `cache migrate` while it works (see migrate.py)
MIGRATE_MARKER = ".offroad-seg-migrate"
# Everything a cache stores at its top level: the only entries `create` ever deletes.
OWN_ENTRIES = ("zarr.json", *ARRAYS, SCALES, HACKATHON, CHECKSUMS, MIGRATE_MARKER)


def compressors(dtype: np.dtype | str, features: bool = False) -> list:
    """Blosc, then a crc32c checksum on every chunk. Chosen by measurement (bench_cache.py and
    bench_int8.py, on DINOv2 features): for features lz4 with bit shuffle stores fp16 tokens at
    0.87 of their size, encoding at ~650 MB/s and decoding at ~1.1 GB/s per core; zstd-3 with
    byte shuffle (the first candidate) saved 3% more space at 1/8 the encoding speed, which a
    GPU extracting 1000+ images/s (~500 MB/s of features) cannot afford. int8 features: lz4
    with bit shuffle, ratio 1.11 at ~1 GB/s, against zstd-1's 1.09 at 0.35 GB/s. Labels are
    blocky uint8 maps: zstd-1 stores them at 1/16 of their size at 500+ MB/s."""
    dtype = np.dtype(dtype)
    if features or dtype.kind == "f":
        codec = zarr.codecs.BloscCodec(
            cname="lz4", clevel=5, shuffle="bitshuffle", typesize=dtype.itemsize
        )
    else:
        codec = zarr.codecs.BloscCodec(
            cname="zstd", clevel=1, shuffle="noshuffle", typesize=dtype.itemsize
        )
    return [codec, zarr.codecs.Crc32cCodec()]


@dataclass(frozen=True)
class CacheSpec:
    """Everything that determines a cache's content."""

    backbone: BackboneSpec
    preprocessing: Preprocessing
    class_map: ClassMap
    names: tuple[str, ...]
    sources_digest: str  # see `sources_digest`: catches edited datasets
    views: tuple[str, ...] = ("identity",)
    dtype: str = "float16"
    images_per_chunk: int = 0  # 0: chosen for ~1 MiB feature chunks
    ignore_unknown_codes: bool = False
    # how `sources_digest` was computed: caches before 0.3 hashed sizes only ("size"); not
    # part of the fingerprint, so that theirs stay valid
    sources_method: str = SOURCES_METHOD
    # the storage layout, not the content (outside the fingerprint: `cache migrate` changes
    # it, and a resumed extraction keeps the cache's own): format version, and for format 2
    # the chunks per shard (0: ~TARGET_SHARD_BYTES of features; never more than the cache has)
    version: int = CACHE_VERSION
    chunks_per_shard: int = 0

    def __post_init__(self) -> None:
        if not self.views or self.views[0] != "identity" or not set(self.views) <= set(VIEWS):
            raise CacheError(f"views {self.views}: the first must be identity, others in {VIEWS}")
        if self.dtype not in FEATURE_DTYPES:
            raise CacheError(f"feature dtype {self.dtype!r}: expected one of {FEATURE_DTYPES}")
        if not self.names:
            raise CacheError("a cache needs at least one image")
        if self.images_per_chunk == 0:
            per_image = math.prod(self.feature_shape) * np.dtype(self.dtype).itemsize
            object.__setattr__(
                self, "images_per_chunk", max(1, round(TARGET_CHUNK_BYTES / per_image))
            )
        if self.version not in VERSIONS:
            raise CacheError(f"cache format version {self.version}: this tool reads {VERSIONS}")
        object.__setattr__(self, "chunks_per_shard", self._shard_chunks())

    def _shard_chunks(self) -> int:
        """Chunks per shard: 1 for format 1 (no shards); never more than the cache holds."""
        if self.version == 1:
            return 1
        chunks = math.ceil(len(self.names) / self.images_per_chunk)
        wanted = self.chunks_per_shard
        if wanted <= 0:
            per_image = math.prod(self.feature_shape) * np.dtype(self.dtype).itemsize
            wanted = max(1, round(TARGET_SHARD_BYTES / (per_image * self.images_per_chunk)))
        return max(1, min(wanted, chunks))

    @property
    def sharded(self) -> bool:
        return self.version >= 2

    @property
    def images_per_unit(self) -> int:
        """Images of one write unit: a chunk (format 1) or a shard (format 2)."""
        return self.images_per_chunk * self.chunks_per_shard

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one view's stored features: the head's input on the token grid; for a
        block cache (C, 1, T), the whole token sequence entering the block (class, register /
        storage, then patch tokens) as one row of T (`models.backbone.stored_tokens`)."""
        bb, (h, w) = self.backbone, self.preprocessing.grid
        if bb.block is None:
            return bb.channels, h, w
        return bb.embed_dim, 1, bb.variant.prefix_tokens + h * w

    @property
    def compat_fingerprint(self) -> str:
        return compat_fingerprint(self.backbone, self.preprocessing, self.class_map)

    @property
    def quantized(self) -> bool:
        """int8 features with per-token scales (see quantize.py)."""
        return self.dtype == "int8"

    @property
    def fingerprint(self) -> str:
        return digest(
            {
                "compat": self.compat_fingerprint,
                "names": list(self.names),
                "sources": self.sources_digest,
                "views": list(self.views),
                "dtype": self.dtype,
                "images_per_chunk": self.images_per_chunk,
                "ignore_unknown_codes": self.ignore_unknown_codes,
            }
        )

    def attributes(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": self.version,
            "chunks_per_shard": self.chunks_per_shard,
            "backbone": self.backbone.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "class_map": self.class_map.to_dict(),
            "views": list(self.views),
            "dtype": self.dtype,
            "images_per_chunk": self.images_per_chunk,
            "ignore_unknown_codes": self.ignore_unknown_codes,
            "sources_digest": self.sources_digest,
            "sources_method": self.sources_method,
            "compat_fingerprint": self.compat_fingerprint,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_attributes(cls, attrs: dict[str, Any], names: Sequence[str]) -> CacheSpec:
        return cls(
            backbone=BackboneSpec.from_dict(attrs["backbone"]),
            preprocessing=Preprocessing.from_dict(attrs["preprocessing"]),
            class_map=ClassMap.from_dict(attrs["class_map"]),
            names=tuple(names),
            sources_digest=attrs["sources_digest"],
            views=tuple(attrs["views"]),
            dtype=attrs["dtype"],
            images_per_chunk=int(attrs["images_per_chunk"]),
            ignore_unknown_codes=bool(attrs["ignore_unknown_codes"]),
            sources_method=attrs.get("sources_method", "size"),
            version=int(attrs["version"]),
            chunks_per_shard=int(attrs.get("chunks_per_shard", 1)),
        )

    def differences(self, other: CacheSpec, compat_only: bool = False) -> list[str]:
        """What differs between two specs, in words, this spec's values first; `compat_only`:
        only what stops their features being used together (backbone, layers, preprocessing,
        classes), not what a training and a validation cache differ in anyway (views, files,
        dtype). The storage layout (images per chunk) follows from the feature size unless
        set, so it is named only when nothing else differs, and said to be storage only."""
        out = compat_differences(
            (self.backbone, self.preprocessing, self.class_map),
            (other.backbone, other.preprocessing, other.class_map),
        )
        if compat_only:
            return out
        if self.views != other.views:
            out.append(f"views {','.join(self.views)} vs {','.join(other.views)}")
        if self.names != other.names or self.sources_digest != other.sources_digest:
            out.append("image files")
        if self.dtype != other.dtype:
            out.append(f"dtype {self.dtype} vs {other.dtype}")
        if self.ignore_unknown_codes != other.ignore_unknown_codes:
            on_off = {True: "on", False: "off"}
            out.append(
                f"--ignore-unknown-codes {on_off[self.ignore_unknown_codes]} vs "
                f"{on_off[other.ignore_unknown_codes]}"
            )
        if not out and self.images_per_chunk != other.images_per_chunk:
            out.append(
                f"storage only: {self.images_per_chunk} vs {other.images_per_chunk} images per "
                "chunk (--images-per-chunk; the features are the same)"
            )
        return out


@dataclass
class StoredFeatures:
    """Features as a cache stores them: float values, or int8 values with their per-token,
    per-layer scales (see quantize.py)."""

    values: np.ndarray  # (..., C, h, w)
    scales: np.ndarray | None = None  # (..., L, h, w) for int8

    def __len__(self) -> int:
        return len(self.values)

    def map(self, fn) -> StoredFeatures:
        """`fn` applied to the values and the scales alike (indexing, reshaping, copying: both
        lead with the same image and view axes)."""
        return StoredFeatures(fn(self.values), None if self.scales is None else fn(self.scales))

    def dequantized(self) -> np.ndarray:
        """Float features: as stored, or int8 values times their scales (float32)."""
        if self.scales is None:
            return self.values
        values, scales = torch.from_numpy(self.values), torch.from_numpy(self.scales)
        return dequantize(values, scales).numpy()


def _layout(spec: CacheSpec, chunks: tuple[int, ...]) -> dict[str, Any]:
    """zarr's create_array arguments for an array of these chunks: in format 2, sharded
    `chunks_per_shard` chunks deep along its first (image or chunk) axis, every inner chunk
    stored (so that one missing from a shard's index means damage)."""
    if not spec.sharded:
        return {"chunks": chunks}
    return {
        "chunks": chunks,
        "shards": (chunks[0] * spec.chunks_per_shard, *chunks[1:]),
        "chunk_key_encoding": SHARD_KEY_ENCODING,
        "config": {"write_empty_chunks": True},
    }


def create_arrays(group: zarr.Group, spec: CacheSpec) -> None:
    """Every array of a new cache, with its names and its `done` flags written: the data
    arrays, then the bookkeeping."""
    _create_data_arrays(group, spec)
    _create_bookkeeping_arrays(group, spec)
    # Write every `done` chunk now so that a missing one later means damage, not "not yet".
    group["done"][:] = False


def _create_data_arrays(group: zarr.Group, spec: CacheSpec) -> None:
    """features (and an int8 cache's scales), the hackathon labels and the labels; a chunk
    holds `images_per_chunk` images of one view."""
    n, v, k = len(spec.names), len(spec.views), spec.images_per_chunk
    c, h, w = spec.feature_shape
    rows, cols = spec.preprocessing.size
    group.create_array(
        "features",
        shape=(n, v, c, h, w),
        **_layout(spec, (k, 1, c, h, w)),
        dtype=spec.dtype,
        compressors=compressors(spec.dtype, features=True),
        fill_value=0,
        dimension_names=("image", "view", "channel", "row", "col"),
    )
    if spec.quantized:
        layers = spec.backbone.stored_layers
        group.create_array(
            SCALES,
            shape=(n, v, layers, h, w),
            **_layout(spec, (k, 1, layers, h, w)),
            dtype="float32",
            compressors=compressors("float32"),
            fill_value=0,
            dimension_names=("image", "view", "layer", "row", "col"),
        )
    group.create_array(
        HACKATHON,
        shape=(n, *HACKATHON_SIZE),
        **_layout(spec, (k, *HACKATHON_SIZE)),
        dtype="uint8",
        compressors=compressors("uint8"),
        fill_value=0,
        dimension_names=("image", "row", "col"),
    )
    group.create_array(
        "labels",
        shape=(n, v, rows, cols),
        **_layout(spec, (k, 1, rows, cols)),
        dtype="uint8",
        compressors=compressors("uint8"),
        fill_value=IGNORE_ID,
        dimension_names=("image", "view", "row", "col"),
    )


def _create_bookkeeping_arrays(group: zarr.Group, spec: CacheSpec) -> None:
    """The `done` flags, the file names (written here), the class histogram and the chunks'
    position checksums."""
    n, v, k = len(spec.names), len(spec.views), spec.images_per_chunk
    group.create_array(
        "done",
        shape=(n,),
        dtype="bool",
        compressors=compressors("bool"),
        fill_value=False,
        # zarr skips chunks equal to the fill value: these must exist, so that a missing
        # one means damage, not "not yet"
        **{**_layout(spec, (k,)), "config": {"write_empty_chunks": True}},
    )
    names = group.create_array(
        "names", shape=(n,), chunks=(n,), dtype=str, compressors=compressors("uint8")
    )
    names[:] = np.array(spec.names, dtype=object)
    group.create_array(
        "class_pixels",
        shape=(spec.class_map.num_classes,),
        chunks=(spec.class_map.num_classes,),
        dtype="int64",
        compressors=compressors("int64"),
        fill_value=0,
    )
    stored_per_chunk = v * (3 if spec.quantized else 2) + 1  # + the hackathon labels
    group.create_array(
        CHECKSUMS,
        shape=(math.ceil(n / k), stored_per_chunk),
        dtype="uint32",
        compressors=compressors("uint32"),
        fill_value=0,
        dimension_names=("chunk", "stored"),
        **{**_layout(spec, (1, stored_per_chunk)), "config": {"write_empty_chunks": True}},
    )
