"""The feature cache: one zarr v3 group per dataset split (format version 1).

Arrays (N images, V views, C channels, h x w tokens, H x W working size, K classes):

    features      (N, V, C, h, w)  float16, float32 or int8  chunks (k, 1, C, h, w)
    scales        (N, V, L, h, w)  float32 (int8 only)     chunks (k, 1, L, h, w)  per token, layer
    hackathon_labels (N, H, W)     uint8 (0.2 on)          chunks (k, H, W)  hackathon protocol ids
    labels        (N, V, H, W)     uint8, 255 = ignore    chunks (k, 1, H, W)
    done          (N,)             bool                   chunks (k,)   set after a chunk's data
    chunk_checksums (N/k, S)       uint32 (0.3 on)        chunks (1, S) each data chunk's crc32c
    names         (N,)             string                 file names, in order
    class_pixels  (K,)             int64                  view-0 label histogram (when complete)

Every chunk is Blosc-compressed (features lz4 + bit shuffle, labels zstd) and carries a crc32c
checksum. A writer
owns whole chunks (k images of every view), which is what makes resume and concurrent writers
safe. The group's attributes describe the backbone, preprocessing, class map and views, with a
`fingerprint` over all of it plus the file list, and `compat_fingerprint` over the parts that
decide whether features from two caches can be mixed (backbone, preprocessing, class map).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
import zarr.codecs
from tqdm.auto import tqdm
from zarr.core.sync import sync

from offroad_seg import __version__
from offroad_seg.core import storage
from offroad_seg.core.atomic import remove_stale_temps
from offroad_seg.core.lock import LOCK_NAME
from offroad_seg.core.storage import CachePath
from offroad_seg.core.text import plural
from offroad_seg.data.classes import IGNORE_ID, ClassMap
from offroad_seg.data.digest import SOURCES_METHOD, SOURCES_METHODS, digest, sources_digest
from offroad_seg.errors import CacheError
from offroad_seg.features.quantize import dequantize
from offroad_seg.models.backbone import BackboneSpec
from offroad_seg.models.fingerprint import compat_fingerprint
from offroad_seg.models.preprocess import Preprocessing

log = logging.getLogger(__name__)

FORMAT = "offroad-seg-cache"
VERSION = 1
VIEWS = ("identity", "hflip")
FEATURE_DTYPES = ("float16", "float32", "int8")
TARGET_CHUNK_BYTES = 1 << 20
ARRAYS = ("features", "labels", "done", "names", "class_pixels")
SCALES = "scales"  # int8 caches only: the per-token, per-layer scales (see quantize.py)
# View 0's labels as the hackathon protocol scores them (metrics.hackathon_truth), so training's
# validation can report it too; caches written before 0.2 lack it.
HACKATHON = "hackathon_labels"
# Written first when a cache is created and removed once its metadata is whole (the group's
# attributes are written last): a folder holding it is provably an unfinished cache of ours,
# which a rerun may redo. (A finished cache holds only zarr's own files.)
MARKER = ".offroad-seg-cache"
# Per data chunk, the crc32c that ends each of its stored chunks (features, labels, scales of
# every view, hackathon labels; `FeatureCache.chunk_coords` order), recorded when it is
# committed: a chunk's own checksum proves its bytes whole, this row proves they are the ones
# written at that position (two chunks swapped on disk each still pass their own checksum).
# Caches written before 0.3 lack it.
CHECKSUMS = "chunk_checksums"
# Everything a cache stores at its top level: the only entries `create` ever deletes.
OWN_ENTRIES = ("zarr.json", *ARRAYS, SCALES, HACKATHON, CHECKSUMS)


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

    def __post_init__(self) -> None:
        if not self.views or self.views[0] != "identity" or not set(self.views) <= set(VIEWS):
            raise CacheError(f"views {self.views}: the first must be identity, others in {VIEWS}")
        if self.dtype not in FEATURE_DTYPES:
            raise CacheError(f"feature dtype {self.dtype!r}: expected one of {FEATURE_DTYPES}")
        if not self.names:
            raise CacheError("a cache needs at least one image")
        if self.images_per_chunk == 0:
            grid = self.preprocessing.grid
            per_image = self.backbone.channels * grid[0] * grid[1] * np.dtype(self.dtype).itemsize
            object.__setattr__(
                self, "images_per_chunk", max(1, round(TARGET_CHUNK_BYTES / per_image))
            )

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
            "version": VERSION,
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
        )

    def differences(self, other: CacheSpec, compat_only: bool = False) -> list[str]:
        """Human-readable list of what differs between two specs; `compat_only`: only what
        stops their features being used together (backbone, layers, preprocessing, classes),
        not what a training and a validation cache differ in anyway (views, files, dtype)."""
        out = []
        a, b = self.backbone, other.backbone
        if a.name != b.name:
            out.append(f"backbone {a.name} vs {b.name}")
        elif a.weights_sha256 != b.weights_sha256:
            out.append(f"backbone weights {a.weights_sha256[:12]} vs {b.weights_sha256[:12]}")
        if a.layers != b.layers:
            out.append(f"layers {a.layers} vs {b.layers}")
        if self.preprocessing != other.preprocessing:
            s, o = self.preprocessing.size, other.preprocessing.size
            out.append(f"preprocessing (size {s[0]}x{s[1]} vs {o[0]}x{o[1]})")
        if self.class_map != other.class_map:
            out.append("class map")
        if compat_only:
            return out
        if self.views != other.views:
            out.append(f"views {','.join(self.views)} vs {','.join(other.views)}")
        if self.names != other.names or self.sources_digest != other.sources_digest:
            out.append("image files")
        if self.dtype != other.dtype:
            out.append(f"dtype {self.dtype} vs {other.dtype}")
        if self.images_per_chunk != other.images_per_chunk:
            out.append(f"images per chunk {self.images_per_chunk} vs {other.images_per_chunk}")
        if self.ignore_unknown_codes != other.ignore_unknown_codes:
            out.append("ignore-unknown-codes setting")
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


@dataclass
class VerifyReport:
    """What `verify` found: problems (damage) name the array, chunk and stored key; an
    interrupted extraction is not damage, only unfinished."""

    chunks_checked: int = 0
    problems: list[str] = field(default_factory=list)
    images: int = 0
    unfinished: int = 0  # images not extracted yet (rerun extract to resume)
    unfinalized: bool = False  # every chunk done, but extract did not get to finalize

    @property
    def ok(self) -> bool:
        return not self.problems and not self.unfinished and not self.unfinalized


def _bad_metadata(path: str, array: str, error: Exception) -> CacheError:
    """An array's zarr.json cannot be read: name the file and the problem in one line."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return CacheError(
        f"{path}/{array}/zarr.json: unreadable array metadata ({type(error).__name__}: "
        f"{reason}); re-extract the cache (`offroad-seg extract ... --overwrite`)"
    )


def _unreadable(cache: FeatureCache, error: Exception) -> CacheError:
    """A read failed: name the damaged chunk (found by a full verify) in one line."""
    try:
        problems = cache.verify(progress=False).problems
    except Exception:
        problems = []
    where = problems[0] if problems else f"{type(error).__name__}: {error}".splitlines()[0]
    return CacheError(
        f"{cache.path}: damaged cache ({where}); re-extract it "
        f"(`offroad-seg cache verify {cache.path}` lists every problem)"
    )


@dataclass(frozen=True)
class Target:
    """What a path holds, as far as writing a cache there goes. `kind`: "empty" (missing, or
    holding only a writer lock), "creating" (a creation of ours that did not finish), "cache"
    (an offroad-seg cache), "damaged" (ours, but its zarr.json is unreadable) or "foreign"
    (anything else: never written to, never cleared). `reason` says why, for the last two."""

    kind: str
    reason: str = ""
    marker: bool = False
    unreadable: str = ""  # "PATH/zarr.json: invalid JSON (...)" when it is


def _scratch(name: str) -> bool:
    """Files a writer of ours leaves at a cache's top level while it works: the writer lock,
    the marker's temporary file, zarr's root metadata being written."""
    return (
        name == LOCK_NAME
        or (name.startswith(f".{MARKER}.") and name.endswith(".tmp"))  # atomic_write's
        or bool(storage.ZARR_PARTIAL.match(name) and name.startswith("zarr."))
    )


def inspect_target(path: CachePath) -> Target:
    """Classify what is stored at `path` (reads its listing and its zarr.json only)."""
    path = storage.normalize(path)
    names = [n for n in storage.entries(path) if not _scratch(n)]
    if not names:
        return Target("empty")
    marker = MARKER in names
    raw = storage.read_key(path, "zarr.json") if "zarr.json" in names else None
    if raw is None:
        if marker:
            return Target("creating", marker=True)
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return Target(
            "foreign",
            f"{path}: folder is not empty ({shown}) and is not an offroad-seg feature cache; "
            "it is left alone, even with --overwrite: choose a new or empty folder",
        )
    try:
        meta = json.loads(raw)
        attributes = meta.get("attributes", {}) if isinstance(meta, dict) else {}
    except ValueError as e:  # invalid JSON or not UTF-8
        problem = f"{path}/zarr.json: invalid JSON ({str(e).splitlines()[0]})"
        # ours if the marker says so, or if it holds nothing but a cache's own entries
        if marker or (set(ARRAYS) <= set(names) and set(names) <= {*OWN_ENTRIES, MARKER}):
            return Target("damaged", problem, marker=marker)
        return Target(
            "foreign",
            f"{problem}; cannot tell whether this is an offroad-seg cache, so it is left "
            "alone: choose another folder, or delete this one yourself",
            unreadable=problem,
        )
    if isinstance(attributes, dict) and attributes.get("format") == FORMAT:
        return Target("cache", marker=marker)
    if marker:
        return Target("creating", marker=True)
    return Target(
        "foreign",
        f"{path}: holds a zarr store that is not an offroad-seg feature cache; it is left "
        "alone, even with --overwrite: choose another folder",
    )


def _marker_bytes() -> bytes:
    return (json.dumps({"format": FORMAT, "version": VERSION, "state": "creating"}) + "\n").encode()


class FeatureCache:
    """A zarr v3 feature cache; see the module docstring for the format."""

    def __init__(self, group: zarr.Group, path: str, spec: CacheSpec) -> None:
        self.group = group
        self.path = path
        self.spec = spec
        self._arrays: dict[str, zarr.Array] = {}

    def _holds(self, name: str) -> bool:
        """Whether the cache stores this (optional) array; its metadata must be readable."""
        try:
            return name in self.group
        except Exception as e:
            raise _bad_metadata(self.path, name, e) from e

    def array(self, name: str) -> zarr.Array:
        """One of the cache's arrays, opened once (each open reads its metadata, a round trip
        on object stores)."""
        if name not in self._arrays:
            try:
                self._arrays[name] = self.group[name]
            except Exception as e:
                raise _bad_metadata(self.path, name, e) from e
        return self._arrays[name]

    # ------------------------------------------------------------------ create / open

    @classmethod
    def create(cls, path: CachePath, spec: CacheSpec, overwrite: bool = False) -> FeatureCache:
        """Create an empty cache at `path`: a missing or empty folder, an unfinished creation
        of ours, or (with `overwrite`) a cache of ours. The marker goes first, the group's
        attributes last, so a crash at any step in between leaves a folder that a rerun
        recognises and redoes; only the cache's own entries are ever deleted."""
        path = storage.normalize(path)
        target = inspect_target(path)
        if target.kind == "foreign":
            raise CacheError(target.reason)
        if target.kind in ("cache", "damaged") and not overwrite:
            raise CacheError(f"{path}: a cache already exists here (use --overwrite to replace)")
        storage.write_key(path, MARKER, _marker_bytes())
        # zarr.json first: from then on the folder no longer looks like a finished cache.
        # Emptied by hand: zarr's mode "w" would delete the writer lock under its holder.
        present = set(storage.entries(path))
        storage.delete_entries(path, [e for e in OWN_ENTRIES if e in present])
        group = storage.open_group(path, mode="a")
        cache = cls._create_arrays(group, path, spec)
        cache._sync_layout()
        # the creation is complete once the format is in the group's zarr.json (one whole write)
        group.update_attributes({**spec.attributes(), "complete": False})
        storage.sync_files(path, [cache._metadata_key()])
        storage.delete_entries(path, [MARKER])
        log.info(
            "created cache %s (%s, %s, %d per chunk)",
            path,
            plural(len(spec.names), "image"),
            plural(len(spec.views), "view"),
            spec.images_per_chunk,
        )
        return cache

    @classmethod
    def _create_arrays(cls, group: zarr.Group, path: str, spec: CacheSpec) -> FeatureCache:
        """Every array of a new cache, with its names and its `done` flags written."""
        n, v, k = len(spec.names), len(spec.views), spec.images_per_chunk
        c = spec.backbone.channels
        (h, w), (rows, cols) = spec.preprocessing.grid, spec.preprocessing.size
        group.create_array(
            "features",
            shape=(n, v, c, h, w),
            chunks=(k, 1, c, h, w),
            dtype=spec.dtype,
            compressors=compressors(spec.dtype, features=True),
            fill_value=0,
            dimension_names=("image", "view", "channel", "row", "col"),
        )
        if spec.quantized:
            layers = spec.backbone.layers
            group.create_array(
                SCALES,
                shape=(n, v, layers, h, w),
                chunks=(k, 1, layers, h, w),
                dtype="float32",
                compressors=compressors("float32"),
                fill_value=0,
                dimension_names=("image", "view", "layer", "row", "col"),
            )
        group.create_array(
            HACKATHON,
            shape=(n, rows, cols),
            chunks=(k, rows, cols),
            dtype="uint8",
            compressors=compressors("uint8"),
            fill_value=0,
            dimension_names=("image", "row", "col"),
        )
        group.create_array(
            "labels",
            shape=(n, v, rows, cols),
            chunks=(k, 1, rows, cols),
            dtype="uint8",
            compressors=compressors("uint8"),
            fill_value=IGNORE_ID,
            dimension_names=("image", "view", "row", "col"),
        )
        group.create_array(
            "done",
            shape=(n,),
            chunks=(k,),
            dtype="bool",
            compressors=compressors("bool"),
            fill_value=False,
            # zarr skips chunks equal to the fill value: these must exist, so that a missing
            # one means damage, not "not yet"
            config={"write_empty_chunks": True},
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
            chunks=(1, stored_per_chunk),
            dtype="uint32",
            compressors=compressors("uint32"),
            fill_value=0,
            dimension_names=("chunk", "stored"),
            config={"write_empty_chunks": True},
        )
        # Write every `done` chunk now so that a missing one later means damage, not "not yet".
        group["done"][:] = False
        return cls(group, path, spec)

    @classmethod
    def open(cls, path: CachePath, mode: str = "r") -> FeatureCache:
        path = storage.normalize(path)
        target = inspect_target(path)
        if target.kind == "empty":
            raise CacheError(f"{path}: no feature cache here (run `offroad-seg extract` first)")
        if target.kind == "creating":
            raise CacheError(
                f"{path}: the cache's creation was interrupted; rerun the same "
                "`offroad-seg extract` command to redo it"
            )
        if target.kind == "damaged":
            raise CacheError(
                f"{target.reason}; the cache's metadata is damaged: re-extract it "
                "(`offroad-seg extract ... --overwrite`)"
            )
        if target.kind == "foreign":
            raise CacheError(
                f"{target.unreadable}; cannot read it as a feature cache"
                if target.unreadable
                else f"{path}: not an offroad-seg feature cache"
                if storage.exists(path)
                else f"{path}: no feature cache here (run `offroad-seg extract` first)"
            )
        try:
            group = storage.open_group(path, mode=mode)
            attrs = dict(group.attrs)
        except CacheError:
            raise
        except Exception as e:
            raise CacheError(f"{path}: cannot open cache ({type(e).__name__}: {e})") from e
        if attrs.get("format") != FORMAT:
            raise CacheError(f"{path}: not an offroad-seg feature cache")
        if attrs.get("version") != VERSION:
            raise CacheError(
                f"{path}: cache format version {attrs.get('version')}; this tool reads {VERSION}"
            )
        missing = [a for a in ARRAYS if not storage.read_key(path, f"{a}/zarr.json")]
        if missing:
            raise CacheError(
                f"{path}: cache is missing arrays {missing}; re-extract it "
                "(`offroad-seg extract ... --overwrite`)"
            )
        try:
            names_array = group["names"]
        except Exception as e:
            raise _bad_metadata(path, "names", e) from e
        try:
            names = [str(s) for s in names_array[:]]
            spec = CacheSpec.from_attributes(attrs, names)
        except Exception as e:
            raise CacheError(f"{path}: damaged cache metadata ({type(e).__name__}: {e})") from e
        cache = cls(group, path, spec)
        if spec.quantized and not cache._holds(SCALES):
            raise CacheError(f"{path}: int8 cache is missing its {SCALES!r} array")
        return cache

    @classmethod
    def open_for_writing(
        cls,
        path: CachePath,
        spec: CacheSpec,
        overwrite: bool = False,
        sources: Sequence[tuple[str, Path, Path | None]] | None = None,
    ) -> FeatureCache:
        """Create a cache, redo an interrupted creation, or reopen a cache made with the same
        spec to resume it. A folder that is not ours is refused, even with `overwrite`.
        `sources` (the samples' files) lets a cache whose sources digest was made another
        way (an older version's) be compared by its own method."""
        path = storage.normalize(path)
        target = inspect_target(path)
        if target.kind == "foreign":
            raise CacheError(target.reason)
        if not storage.is_remote(path):  # what a killed writer of ours left behind
            remove_stale_temps(path)
            storage.remove_partial_writes(path, OWN_ENTRIES)
        if target.kind == "damaged" and not overwrite:
            raise CacheError(f"{target.reason}; use --overwrite to re-extract it")
        if overwrite or target.kind in ("empty", "creating"):
            if target.kind == "creating":
                log.info("%s: redoing the cache's interrupted creation", path)
            return cls.create(path, spec, overwrite=True)
        if target.marker:  # the creation finished; only removing the marker did not
            storage.delete_entries(path, [MARKER])
        cache = cls.open(path, mode="r+")
        if sources is not None and cache.spec.sources_method != spec.sources_method:
            method = cache.spec.sources_method
            digest_then = sources_digest(sources, method) if method in SOURCES_METHODS else ""
            spec = replace(spec, sources_digest=digest_then, sources_method=method)
        if cache.spec.fingerprint != spec.fingerprint:
            diff = "; ".join(cache.spec.differences(spec)) or "fingerprint"
            raise CacheError(
                f"{path}: existing cache was made with different settings ({diff}); "
                "use another path or --overwrite"
            )
        return cache

    # ------------------------------------------------------------------ shape facts

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def num_images(self) -> int:
        return len(self.spec.names)

    @property
    def num_views(self) -> int:
        return len(self.spec.views)

    @property
    def channels(self) -> int:
        return self.spec.backbone.channels

    @property
    def images_per_chunk(self) -> int:
        return self.spec.images_per_chunk

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_images / self.images_per_chunk)

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete", False))

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        k = self.images_per_chunk
        return chunk * k, min((chunk + 1) * k, self.num_images)

    # ------------------------------------------------------------------ writing

    def done(self) -> np.ndarray:
        try:
            return np.asarray(self.array("done")[:], dtype=bool)
        except CacheError:
            raise
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CacheError(
                f"{self.path}: damaged cache (done flags unreadable: {reason}); re-extract it "
                f"(`offroad-seg cache verify {self.path}` lists every problem)"
            ) from e

    def pending_chunks(self) -> list[int]:
        """Chunks not yet marked done (a chunk is done only when all its images are)."""
        done = self.done()
        return [c for c in range(self.num_chunks) if not done[slice(*self.chunk_range(c))].all()]

    def write_chunk(
        self,
        chunk: int,
        features: np.ndarray,
        labels: np.ndarray,
        scales: np.ndarray | None = None,
        hackathon: np.ndarray | None = None,
    ) -> None:
        """Write one whole chunk and commit it (`write_chunk_data`, then `commit_chunks`)."""
        self.write_chunk_data(chunk, features, labels, scales, hackathon)
        self.commit_chunks([chunk])

    def write_chunk_data(
        self,
        chunk: int,
        features: np.ndarray,
        labels: np.ndarray,
        scales: np.ndarray | None = None,
        hackathon: np.ndarray | None = None,
    ) -> None:
        """Write one whole chunk's data (features (n, V, C, h, w) as stored, labels
        (n, V, H, W), for int8 caches scales (n, V, L, h, w), and view 0's hackathon-protocol
        labels (n, H, W)) without marking it done: until `commit_chunks`, a crash leaves it
        pending, never half-trusted."""
        start, stop = self.chunk_range(chunk)
        n = stop - start
        f_shape = (n, self.num_views, *self.array("features").shape[2:])
        l_shape = (n, self.num_views, *self.array("labels").shape[2:])
        if features.shape != f_shape or labels.shape != l_shape:
            raise ValueError(
                f"chunk {chunk}: got {features.shape}/{labels.shape}, want {f_shape}/{l_shape}"
            )
        if self.spec.quantized != (scales is not None):
            raise ValueError(f"chunk {chunk}: scales go with int8 features, and only with them")
        self.array("features")[start:stop] = features.astype(self.spec.dtype, copy=False)
        if scales is not None:
            self.array(SCALES)[start:stop] = scales.astype(np.float32, copy=False)
        if self.has_hackathon_labels != (hackathon is not None):
            raise ValueError(f"chunk {chunk}: hackathon labels go with caches that store them")
        if hackathon is not None:
            self.array(HACKATHON)[start:stop] = hackathon
        self.array("labels")[start:stop] = labels

    def chunk_coords(self, chunk: int) -> list[tuple[str, tuple[int, ...]]]:
        """(array, chunk coordinates) of a data chunk's stored chunks: features, labels (and
        scales) of every view, then the hackathon labels."""
        out = []
        for name in ["features", "labels", *([SCALES] if self.spec.quantized else [])]:
            rest = (0,) * (self.array(name).ndim - 2)  # whole chunks along the other axes
            out += [(name, (chunk, v, *rest)) for v in range(self.num_views)]
        if self.has_hackathon_labels:  # (image, row, col): no view axis
            out.append((HACKATHON, (chunk, 0, 0)))
        return out

    def chunk_keys(self, chunk: int) -> list[str]:
        """The store keys of a chunk's data: features, labels (and scales) of every view."""
        return [self._chunk_key(name, coords) for name, coords in self.chunk_coords(chunk)]

    @property
    def has_checksums(self) -> bool:
        """Whether the cache records its chunks' checksums by position (caches from 0.3 on)."""
        if "_has_checksums" not in self.__dict__:
            self._has_checksums = self._holds(CHECKSUMS)
        return self._has_checksums

    def _record_checksums(self, chunks: Sequence[int]) -> list[str]:
        """Record the checksums that end the chunks' stored data, by position; the keys of
        the records written."""
        arr = self.array(CHECKSUMS)
        keys = [self.chunk_keys(c) for c in chunks]
        tails = storage.read_checksums(self.group.store, [k for ks in keys for k in ks])
        per = len(keys[0]) if keys else 0
        for i, chunk in enumerate(chunks):
            arr[chunk] = np.asarray(tails[i * per : (i + 1) * per], dtype=np.uint32)
        return [self._chunk_key(CHECKSUMS, (c, 0)) for c in chunks]

    def position_problems(self, chunks: Sequence[int], skip: set[str] = frozenset()) -> list[str]:
        """Stored chunks of these data chunks that are not the ones written there: each one's
        checksum is compared with the one recorded for its position (`skip`: keys already
        known to be damaged). A chunk holding another position's data names it."""
        if not self.has_checksums or not chunks:
            return []
        try:
            recorded = np.asarray(self.array(CHECKSUMS)[:], dtype=np.uint32)
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            return [f"{CHECKSUMS}: unreadable ({reason})"]
        coords = [self.chunk_coords(c) for c in chunks]
        keys = [[self._chunk_key(n, xy) for n, xy in cs] for cs in coords]
        actual = storage.read_checksums(self.group.store, [k for ks in keys for k in ks])
        problems = []
        per = recorded.shape[1]
        for i, chunk in enumerate(chunks):
            for j, ((name, xy), key) in enumerate(zip(coords[i], keys[i], strict=True)):
                want, got = int(recorded[chunk, j]), actual[i * per + j]
                if key in skip or not want or not got or want == got:
                    continue  # unrecorded, missing (reported elsewhere) or right
                owners = np.argwhere(recorded == got)
                if len(owners):
                    other, other_xy = self.chunk_coords(int(owners[0][0]))[int(owners[0][1])]
                    problems.append(
                        f"{name} chunk {xy}: holds the data of {other} chunk {other_xy} ({key}); "
                        "chunks were swapped or moved"
                    )
                else:
                    problems.append(
                        f"{name} chunk {xy}: not the data written there ({key}); its "
                        "checksum differs from the one recorded"
                    )
        return problems

    def commit_chunks(self, chunks: Sequence[int]) -> None:
        """Make written chunks durable, then mark them done. On a local disk their files and
        folders are fsynced first (zarr itself never fsyncs), so a power loss cannot leave a
        `done` flag claiming data that was still in the page cache; one call per group of
        chunks shares the cost (see bench/bench_fsync.py)."""
        if not chunks:
            return
        keys = [k for c in chunks for k in self.chunk_keys(c)]
        if self.has_checksums:
            keys += self._record_checksums(chunks)
        storage.sync_files(self.path, keys)
        done = self.array("done")
        for chunk in chunks:
            done[slice(*self.chunk_range(chunk))] = True

    def finalize(self) -> None:
        """Count the label histogram and mark the cache complete (all chunks must be done)."""
        pending = self.pending_chunks()
        if pending:
            raise CacheError(f"{self.path}: {len(pending)} chunks unfinished; cannot finalize")
        self.array("class_pixels")[:] = self.count_class_pixels()
        # `complete` must not reach the disk before what it vouches for
        self._sync_layout(finished=True)
        self.group.update_attributes(
            {
                "complete": True,
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "tool_version": __version__,
            }
        )
        storage.sync_files(self.path, [self._metadata_key()])

    def count_class_pixels(self) -> np.ndarray:
        """View-0 label histogram, counted from the stored labels chunk by chunk."""
        k = self.spec.class_map.num_classes
        counts = np.zeros(k, dtype=np.int64)
        labels = self.array("labels")
        for chunk in range(self.num_chunks):
            block = labels[slice(*self.chunk_range(chunk)), 0]
            counts += np.bincount(block.ravel(), minlength=256)[:k]
        return counts

    # ------------------------------------------------------------------ reading

    def require_complete(self) -> None:
        """Refuse an unfinished cache, one whose chunk files went missing (zarr would silently
        read a missing chunk as zeros) or sit at another position, and one whose attributes
        contradict its stored fingerprint (edited by hand). Checked once per open cache."""
        if self.__dict__.get("_checked"):
            return
        self.check_metadata()
        done = int(self.done().sum())
        if not self.complete or done < self.num_images:
            raise CacheError(
                f"{self.path}: cache is unfinished ({done}/{self.num_images} images); "
                "rerun the same `offroad-seg extract` command to finish it"
            )
        for name in ("features", "labels", *self._optional_arrays()):
            arr = self.array(name)
            if arr.nchunks_initialized < arr.nchunks:
                raise _unreadable(self, CacheError(f"{name}: chunks missing"))
        misplaced = self.position_problems(range(self.num_chunks))
        if misplaced:
            more = f"; {len(misplaced) - 2} more" if len(misplaced) > 2 else ""
            raise CacheError(
                f"{self.path}: damaged cache ({'; '.join(misplaced[:2])}{more}); re-extract it "
                f"(`offroad-seg cache verify {self.path}` lists every problem)"
            )
        self._checked = True

    def check_metadata(self) -> None:
        """Refuse a cache whose attributes (backbone, preprocessing, class names, files, ...)
        do not match the fingerprint stored with them: edited after extraction, they no longer
        describe the features and labels."""
        attrs = self.attrs
        if attrs.get("fingerprint") == self.spec.fingerprint:
            return
        what = (
            "backbone, preprocessing or class map"
            if attrs.get("compat_fingerprint") != self.spec.compat_fingerprint
            else "views, files or storage settings"
        )
        raise CacheError(
            f"{self.path}/zarr.json: the cache's attributes do not match their stored "
            f"fingerprint (its {what} were edited); re-extract it"
        )

    @property
    def has_hackathon_labels(self) -> bool:
        if "_has_hackathon" not in self.__dict__:
            self._has_hackathon = self._holds(HACKATHON)
        return self._has_hackathon

    def _optional_arrays(self) -> list[str]:
        return [
            *([SCALES] if self.spec.quantized else []),
            *([HACKATHON] if self.has_hackathon_labels else []),
            *([CHECKSUMS] if self.has_checksums else []),
        ]

    def hackathon_labels(self) -> np.ndarray | None:
        """View 0's labels as the hackathon protocol scores them (N, H, W), or None for caches
        written before they were stored."""
        if not self.has_hackathon_labels:
            return None
        try:
            return self.array(HACKATHON)[:]
        except Exception as e:
            raise _unreadable(self, e) from e

    def class_pixels(self) -> np.ndarray:
        self.require_complete()
        try:
            return np.asarray(self.array("class_pixels")[:], dtype=np.int64)
        except Exception as e:
            raise _unreadable(self, e) from e

    def _read(self, selection, oindex: bool = False) -> tuple[StoredFeatures, np.ndarray]:
        """Features (as stored) and labels of a selection of images, in one zarr read per
        array so that their chunks are fetched and decoded concurrently."""

        def get(name: str) -> np.ndarray:
            arr = self.array(name)
            return arr.oindex[selection] if oindex else arr[selection]

        try:
            scales = get(SCALES) if self.spec.quantized else None
            return StoredFeatures(get("features"), scales), get("labels")
        except Exception as e:
            raise _unreadable(self, e) from e

    def read_chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """(features (n, V, C, h, w), labels (n, V, H, W)) of one chunk; int8 features come
        back dequantized (float32)."""
        stored, labels = self._read(slice(*self.chunk_range(chunk)))
        return stored.dequantized(), labels

    def read_images_stored(self, indices: np.ndarray) -> tuple[StoredFeatures, np.ndarray]:
        """(features as stored, labels) of the given images (sorted indices)."""
        return self._read(indices, oindex=True)

    def read_images(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of the given images (sorted indices); int8 dequantized."""
        stored, labels = self.read_images_stored(indices)
        return stored.dequantized(), labels

    def iter_chunks(
        self, order: Sequence[int] | None = None
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Stream (first image index, features, labels) chunk by chunk, in `order`."""
        for chunk in order if order is not None else range(self.num_chunks):
            features, labels = self.read_chunk(chunk)
            yield self.chunk_range(chunk)[0], features, labels

    def load_stored(self, progress: bool = False) -> tuple[StoredFeatures, np.ndarray]:
        """The whole cache in memory as stored: features (N, V, C, h, w) (with scales
        (N, V, L, h, w) for int8) and labels (N, V, H, W)."""
        self.require_complete()
        names = ["features", "labels", *([SCALES] if self.spec.quantized else [])]
        out = {name: np.empty(self.array(name).shape, self.array(name).dtype) for name in names}
        # Many chunks per read: zarr fetches and decodes the chunks of one selection
        # concurrently (about 2x faster than chunk by chunk on 2 cores, more on more).
        per_read = self.images_per_chunk * max(1, 64 // self.num_views)
        bar = tqdm(
            total=self.num_images, unit="img", desc="load cache", disable=None if progress else True
        )
        for start in range(0, self.num_images, per_read):
            sel = slice(start, min(start + per_read, self.num_images))
            try:
                for name in names:
                    out[name][sel] = self.array(name)[sel]
            except Exception as e:
                raise _unreadable(self, e) from e
            bar.update(sel.stop - sel.start)
        bar.close()
        return StoredFeatures(out["features"], out.get(SCALES)), out["labels"]

    def load(self, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The whole cache in memory: features (N, V, C, h, w) and labels (N, V, H, W); int8
        features come back dequantized (float32)."""
        stored, labels = self.load_stored(progress)
        return stored.dequantized(), labels

    # ------------------------------------------------------------------ inspection

    def bytes_on_disk(self) -> int:
        return storage.bytes_stored(self.path, self.group)

    def info(self) -> dict[str, Any]:
        """Summary of a cache for `cache info` (JSON-serialisable)."""
        done = int(self.done().sum())
        features = self.array("features")
        stored = self.bytes_on_disk()
        raw = features.nbytes + self.array("labels").nbytes
        if self.spec.quantized:
            raw += self.array(SCALES).nbytes
        prep = self.spec.preprocessing
        return {
            "path": self.path,
            "complete": self.complete,
            "images": self.num_images,
            "done": done,
            "views": list(self.spec.views),
            "features": {
                "shape": list(features.shape),
                "dtype": self.spec.dtype,
                "chunks": list(features.chunks),
                **({"scales": list(self.array(SCALES).shape)} if self.spec.quantized else {}),
            },
            "labels": {"shape": list(self.array("labels").shape), "dtype": "uint8"},
            "images_per_chunk": self.images_per_chunk,
            "bytes_on_disk": stored,
            "bytes_per_image": stored / max(1, done) if done else None,
            "compression_ratio": raw * done / self.num_images / stored if done else None,
            "backbone": self.spec.backbone.to_dict(),
            "preprocessing": {"size": list(prep.size), "grid": list(prep.grid)},
            "classes": self.spec.class_map.names,
            "compat_fingerprint": self.spec.compat_fingerprint,
            "fingerprint": self.spec.fingerprint,
        }

    def _metadata_key(self, array: str | None = None) -> str:
        prefix = f"{self.group.path}/" if self.group.path else ""
        return f"{prefix}{array}/zarr.json" if array else f"{prefix}zarr.json"

    def _sync_layout(self, finished: bool = False) -> None:
        """fsync (local caches) everything but the data chunks: the group's and arrays'
        metadata and the names at creation; also every `done` chunk and the class histogram
        when `finished` (zarr writes no chunk that equals the fill value, so before that they
        may not exist). Data chunks are synced by `commit_chunks`."""
        arrays = [*ARRAYS, *([SCALES] if self.spec.quantized else [])]
        keys = [self._metadata_key(), *(self._metadata_key(a) for a in arrays)]
        keys.append(self._chunk_key("names", (0,)))
        if finished:
            keys += [self._chunk_key("done", (c,)) for c in range(self.num_chunks)]
            keys.append(self._chunk_key("class_pixels", (0,)))
        storage.sync_files(self.path, keys)

    def _chunk_key(self, array: str, coords: tuple[int, ...]) -> str:
        prefix = f"{self.group.path}/" if self.group.path else ""
        return f"{prefix}{array}/c/" + "/".join(str(c) for c in coords)

    def verify(self, progress: bool = True) -> VerifyReport:
        """Read every chunk of every array: checksums, presence, done flags, fingerprint and the
        class histogram. Problems name the array, the chunk and its key in the store."""
        report = VerifyReport()
        attrs = self.attrs
        if attrs.get("fingerprint") != self.spec.fingerprint:
            report.problems.append(
                "attributes: stored fingerprint does not match the cache's settings"
            )
        store = self.group.store
        damaged: set[str] = set()
        done = np.zeros(self.num_images, dtype=bool)
        arrays = ("done", "names", "class_pixels", "features", "labels", *self._optional_arrays())
        total = sum(math.prod(self.array(a).cdata_shape) for a in arrays)
        bar = tqdm(total=total, unit="chunk", desc="verify", disable=None if progress else True)
        for name in arrays:
            arr = self.array(name)
            for coords in np.ndindex(*arr.cdata_shape):
                key = self._chunk_key(name, coords)
                bar.update(1)
                report.chunks_checked += 1
                needed = (
                    name not in ("features", "labels", SCALES, HACKATHON, CHECKSUMS)
                    or done[slice(*self.chunk_range(coords[0]))].all()
                )
                if name == "class_pixels" and not self.complete:
                    needed = False
                if name == "done" and not self.complete:
                    needed = False  # caches written before 0.2 stored no chunk of False flags
                if not sync(store.exists(key)):
                    if needed:
                        report.problems.append(f"{name} chunk {coords}: missing ({key})")
                        damaged.add(key)
                    continue
                try:
                    block = arr.get_block_selection(coords)
                except Exception as e:
                    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                    report.problems.append(f"{name} chunk {coords}: unreadable ({key}): {reason}")
                    damaged.add(key)
                    continue
                if name == "done":
                    k = self.images_per_chunk
                    done[coords[0] * k : coords[0] * k + len(block)] = block
        bar.close()
        if not any(p.startswith(CHECKSUMS) for p in report.problems):
            finished = [
                c for c in range(self.num_chunks) if done[slice(*self.chunk_range(c))].all()
            ]
            report.problems += self.position_problems(finished, skip=damaged)
        report.images = self.num_images
        report.unfinished = int((~done).sum())
        if self.complete and report.unfinished:
            report.problems.append(
                f"done: {report.unfinished} of {self.num_images} images are not marked done in a "
                "cache marked complete"
            )
        report.unfinalized = not self.complete and not report.unfinished
        if self.complete and not any(
            p.startswith(("labels", "class_pixels")) for p in report.problems
        ):
            stored = np.asarray(self.array("class_pixels")[:])
            if not np.array_equal(stored, self.count_class_pixels()):
                report.problems.append("class_pixels: does not match the stored labels")
        return report
