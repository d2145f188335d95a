"""`FeatureCache`: create a feature cache, open it (or reopen it to resume), write and commit
whole chunks, finalize it, and read it back (chunk by chunk, by image, or whole), refusing
unfinished, damaged or edited caches in one line. The format is described in `cache_format`,
who owns a cache folder in `cache_folder`, the full check in `verify`. (About 600 lines: one
class, whose create, write and read methods share its open group and lazily opened arrays.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tqdm.auto import tqdm

from offroad_seg import __version__
from offroad_seg.core import storage
from offroad_seg.core.storage import CachePath
from offroad_seg.core.text import plural
from offroad_seg.data.digest import SOURCES_METHODS, sources_digest
from offroad_seg.errors import CacheError
from offroad_seg.features.cache_folder import (
    claim_for_creation,
    inspect_target,
    refuse_unless_cache,
    remove_marker,
    remove_writer_leftovers,
)
from offroad_seg.features.cache_format import (
    ARRAYS,
    CHECKSUMS,
    FORMAT,
    HACKATHON,
    SCALES,
    VERSIONS,
    CacheSpec,
    StoredFeatures,
    create_arrays,
)
from offroad_seg.features.cache_info import cache_info
from offroad_seg.features.chunk_positions import position_problems, record_checksums
from offroad_seg.features.chunk_store import StoredChunk, locate
from offroad_seg.features.verify import VerifyReport, verify_cache

log = logging.getLogger(__name__)


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


class FeatureCache:
    """A zarr v3 feature cache; see `cache_format` for the format."""

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
        claim_for_creation(path, overwrite)
        group = storage.open_group(path, mode="a")
        create_arrays(group, spec)
        cache = cls(group, path, spec)
        cache._sync_layout()
        # the creation is complete once the format is in the group's zarr.json (one whole write)
        group.update_attributes({**spec.attributes(), "complete": False})
        storage.sync_files(path, [cache._metadata_key()])
        remove_marker(path)
        log.info(
            "created cache %s (%s, %s, %d per chunk)",
            path,
            plural(len(spec.names), "image"),
            plural(len(spec.views), "view"),
            spec.images_per_chunk,
        )
        return cache

    @classmethod
    def open(cls, path: CachePath, mode: str = "r") -> FeatureCache:
        path = storage.normalize(path)
        refuse_unless_cache(path)
        try:
            group = storage.open_group(path, mode=mode)
            attrs = dict(group.attrs)
        except CacheError:
            raise
        except Exception as e:
            raise CacheError(f"{path}: cannot open cache ({type(e).__name__}: {e})") from e
        if attrs.get("format") != FORMAT:
            raise CacheError(f"{path}: not an offroad-seg feature cache")
        if attrs.get("version") not in VERSIONS:
            versions = " and ".join(map(str, VERSIONS))
            raise CacheError(
                f"{path}: cache format version {attrs.get('version')}; this tool reads "
                f"{versions} (a newer offroad-seg wrote it?)"
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
        remove_writer_leftovers(path)
        if target.kind == "damaged" and not overwrite:
            raise CacheError(f"{target.reason}; use --overwrite to re-extract it")
        if overwrite or target.kind in ("empty", "creating"):
            if target.kind == "creating":
                log.info("%s: redoing the cache's interrupted creation", path)
            return cls.create(path, spec, overwrite=True)
        if target.marker:  # the creation finished; only removing the marker did not
            remove_marker(path)
        cache = cls.open(path, mode="r+")
        if sources is not None and cache.spec.sources_method != spec.sources_method:
            method = cache.spec.sources_method
            digest_then = sources_digest(sources, method) if method in SOURCES_METHODS else ""
            spec = replace(spec, sources_digest=digest_then, sources_method=method)
        if cache.spec.fingerprint != spec.fingerprint:
            diff = "; ".join(cache.spec.differences(spec)) or "fingerprint"
            raise CacheError(
                f"{path}: made with other settings (the cache vs this run: {diff}); "
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

    @property
    def chunks_per_unit(self) -> int:
        """Chunks of a write unit, the most one writer writes at once and resume redoes: one
        chunk (format 1), or one shard (format 2: zarr rewrites a whole shard on any write,
        so no two processes may write one)."""
        return self.spec.chunks_per_shard

    @property
    def num_units(self) -> int:
        return math.ceil(self.num_chunks / self.chunks_per_unit)

    def unit_chunks(self, unit: int) -> range:
        per = self.chunks_per_unit
        return range(unit * per, min((unit + 1) * per, self.num_chunks))

    def unit_range(self, unit: int) -> tuple[int, int]:
        chunks = self.unit_chunks(unit)
        return self.chunk_range(chunks[0])[0], self.chunk_range(chunks[-1])[1]

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
        pending, never half-trusted. (In a sharded cache this rewrites the chunk's shard:
        extract writes whole units, `write_unit_data`.)"""
        self._write_images(
            f"chunk {chunk}", *self.chunk_range(chunk), features, labels, scales, hackathon
        )

    def write_unit_data(
        self,
        unit: int,
        features: np.ndarray,
        labels: np.ndarray,
        scales: np.ndarray | None = None,
        hackathon: np.ndarray | None = None,
    ) -> None:
        """Write one whole write unit's data (a chunk, or a shard's chunks in format 2: one
        write per array and shard) without marking it done; as `write_chunk_data`."""
        self._write_images(
            f"unit {unit}", *self.unit_range(unit), features, labels, scales, hackathon
        )

    def _write_images(
        self,
        what: str,
        start: int,
        stop: int,
        features: np.ndarray,
        labels: np.ndarray,
        scales: np.ndarray | None,
        hackathon: np.ndarray | None,
    ) -> None:
        n = stop - start
        f_shape = (n, self.num_views, *self.array("features").shape[2:])
        l_shape = (n, self.num_views, *self.array("labels").shape[2:])
        if features.shape != f_shape or labels.shape != l_shape:
            raise ValueError(
                f"{what}: got {features.shape}/{labels.shape}, want {f_shape}/{l_shape}"
            )
        if self.spec.quantized != (scales is not None):
            raise ValueError(f"{what}: scales go with int8 features, and only with them")
        self.array("features")[start:stop] = features.astype(self.spec.dtype, copy=False)
        if scales is not None:
            self.array(SCALES)[start:stop] = scales.astype(np.float32, copy=False)
        if self.has_hackathon_labels != (hackathon is not None):
            raise ValueError(f"{what}: hackathon labels go with caches that store them")
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
        """The store keys holding a chunk's data (features, labels and scales of every view,
        the hackathon labels): its own files, or in format 2 the shards that hold it."""
        return list(dict.fromkeys(s.key for s in self.stored_chunks(chunk)))

    def stored_chunks(self, chunk: int) -> list[StoredChunk]:
        """Where each stored chunk of a data chunk is (`chunk_coords` order)."""
        return [self.locate(name, coords) for name, coords in self.chunk_coords(chunk)]

    def locate(self, array: str, coords: tuple[int, ...]) -> StoredChunk:
        """Where one chunk of one array is stored (by the array's own layout)."""
        prefix = f"{self.group.path}/{array}" if self.group.path else array
        return locate(prefix, self.array(array), coords)

    @property
    def has_checksums(self) -> bool:
        """Whether the cache records its chunks' checksums by position (caches from 0.3 on)."""
        if "_has_checksums" not in self.__dict__:
            self._has_checksums = self._holds(CHECKSUMS)
        return self._has_checksums

    def commit_chunks(self, chunks: Sequence[int]) -> None:
        """Make written chunks durable, then mark them done. On a local disk their files and
        folders are fsynced first (zarr itself never fsyncs), so a power loss cannot leave a
        `done` flag claiming data that was still in the page cache; one call per group of
        chunks shares the cost (see bench/bench_fsync.py)."""
        if not chunks:
            return
        keys = [k for c in chunks for k in self.chunk_keys(c)]
        if self.has_checksums:
            keys += record_checksums(self, chunks)
        storage.sync_files(self.path, list(dict.fromkeys(keys)))
        done = self.array("done")
        for first, last in _runs(chunks):  # one write per run: a whole shard in format 2
            done[self.chunk_range(first)[0] : self.chunk_range(last)[1]] = True

    def commit_units(self, units: Sequence[int]) -> None:
        """`commit_chunks` for the chunks of whole write units."""
        self.commit_chunks([c for u in units for c in self.unit_chunks(u)])

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
        for name in ("features", "labels", *self.optional_arrays()):
            arr = self.array(name)
            if arr.nchunks_initialized < arr.nchunks:
                raise _unreadable(self, CacheError(f"{name}: chunks missing"))
        misplaced = position_problems(self, range(self.num_chunks))
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

    def optional_arrays(self) -> list[str]:
        return [
            *([SCALES] if self.spec.quantized else []),
            *([HACKATHON] if self.has_hackathon_labels else []),
            *([CHECKSUMS] if self.has_checksums else []),
        ]

    @property
    def hackathon_size(self) -> tuple[int, int] | None:
        """The size its hackathon labels are stored at: the protocol's 266x476 (older caches
        hold them at their working size, and are scored there); None for caches without them."""
        if not self.has_hackathon_labels:
            return None
        return tuple(self.array(HACKATHON).shape[1:])

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

    def read_range_stored(self, start: int, stop: int) -> tuple[StoredFeatures, np.ndarray]:
        """(features as stored, labels) of images start..stop: one read per array, whole
        shards fetched in one request each."""
        return self._read(slice(start, stop))

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
        """Summary of a cache for `cache info` (see `cache_info`)."""
        return cache_info(self)

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
        keys.append(self.chunk_key("names", (0,)))
        if finished:
            keys += [self.chunk_key("done", (c,)) for c in range(self.num_chunks)]
            keys.append(self.chunk_key("class_pixels", (0,)))
        storage.sync_files(self.path, list(dict.fromkeys(keys)))

    def chunk_key(self, array: str, coords: tuple[int, ...]) -> str:
        """The store key holding one chunk of an array (its shard's, when sharded)."""
        return self.locate(array, coords).key

    def verify(self, progress: bool = True) -> VerifyReport:
        """Read every chunk of every array (see `verify_cache`)."""
        return verify_cache(self, progress)


def _runs(chunks: Sequence[int]) -> list[tuple[int, int]]:
    """(first, last) of each run of consecutive chunks, in order."""
    out: list[tuple[int, int]] = []
    for c in sorted(chunks):
        if out and c == out[-1][1] + 1:
            out[-1] = (out[-1][0], c)
        else:
            out.append((c, c))
    return out
