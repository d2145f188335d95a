"""`offroad-seg cache migrate`: rewrite a format-1 cache (a file per chunk) as format 2 (chunks
packed in shards), in place, without decoding anything.

Each chunk's stored bytes are copied unchanged into its shard (zarr's sharding format: the inner
chunks one after another, then an index of (offset, length) per chunk and the index's crc32c),
so the features cannot change and the checksums recorded by position stay valid. The shards'
keys (`c.s.v.0.0.0`) never collide with format 1's (`c/i/v/0/0/0`), which makes every step
safe to interrupt:

1. write `.offroad-seg-migrate` (the chunks per shard chosen: a rerun keeps them);
2. per array: write its shards beside its chunks (each whole or not at all), then replace the
   array's zarr.json with the sharded one (one atomic write): until then it reads its chunks;
3. set the group's `version` to 2; 4. delete the arrays' format-1 chunk folders (`NAME/c`);
5. remove the marker.

A kill at any point leaves a cache that reads correctly (every array reads whichever layout its
own zarr.json names), and a rerun of the same command finishes the job. Only the format-1 chunk
folders of the cache's own arrays, the marker and shards it wrote are ever deleted or replaced.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import dataclass, replace

import google_crc32c
import numpy as np
from zarr.abc.store import RangeByteRequest

from offroad_seg.core import storage
from offroad_seg.core.storage import CachePath
from offroad_seg.errors import CacheError
from offroad_seg.features.cache import FeatureCache
from offroad_seg.features.cache_folder import remove_writer_leftovers
from offroad_seg.features.cache_format import (
    CHECKSUMS,
    HACKATHON,
    MIGRATE_MARKER,
    SCALES,
    SHARD_KEY_ENCODING,
)
from offroad_seg.features.chunk_store import EMPTY

log = logging.getLogger(__name__)


@dataclass
class MigrateSummary:
    cache: str
    chunks_per_shard: int
    shards_written: int
    already: bool = False

    def line(self) -> str:
        if self.already:
            return f"{self.cache}: already cache format 2; nothing to do"
        return (
            f"{self.cache}: now cache format 2 ({self.shards_written} shards written, "
            f"{self.chunks_per_shard} chunks per shard)"
        )


def sharded_arrays(cache: FeatureCache) -> list[str]:
    """The arrays format 2 shards (all but `names` and `class_pixels`, one chunk each)."""
    optional = [a for a in (SCALES, HACKATHON, CHECKSUMS) if a in cache.optional_arrays()]
    return ["done", "features", "labels", *optional]


def migrate(path: CachePath, chunks_per_shard: int = 0) -> MigrateSummary:
    """Rewrite the format-1 cache at `path` as format 2 (see the module's docstring); a rerun
    after an interruption finishes it."""
    path = storage.normalize(path)
    with storage.writer_lock(path, "migrate"):
        remove_writer_leftovers(path)
        cache = FeatureCache.open(path, mode="r+")
        raw = storage.read_key(path, MIGRATE_MARKER)
        if raw is None and cache.spec.version >= 2:
            return MigrateSummary(path, cache.spec.chunks_per_shard, 0, already=True)
        if raw is None:
            cache.require_complete()  # an unfinished or damaged cache is refused in one line
            per = replace(cache.spec, version=2, chunks_per_shard=chunks_per_shard)
            cps = per.chunks_per_shard
            storage.write_key(path, MIGRATE_MARKER, json.dumps({"chunks_per_shard": cps}).encode())
        else:
            cps = _marker_chunks(path, raw)
            log.info("%s: finishing an interrupted migration", path)
        written = 0
        arrays = sharded_arrays(cache)
        for name in arrays:
            if cache.array(name).shards is None:
                written += _write_shards(cache, name, cps)
                _switch_metadata(path, name, cps)
        cache = FeatureCache.open(path, mode="r+")
        cache.group.update_attributes({"version": 2, "chunks_per_shard": cps})
        storage.sync_files(path, ["zarr.json"])
        storage.delete_entries(path, [f"{name}/c" for name in arrays])
        storage.delete_entries(path, [MIGRATE_MARKER])
    return MigrateSummary(path, cps, written)


def _marker_chunks(path: str, raw: bytes) -> int:
    try:
        return int(json.loads(raw)["chunks_per_shard"])
    except (ValueError, KeyError, TypeError) as e:
        raise CacheError(
            f"{path}/{MIGRATE_MARKER}: unreadable migration record ({e}); restore the cache "
            "from a copy or re-extract it"
        ) from e


def _write_shards(cache: FeatureCache, name: str, cps: int) -> int:
    """Write every shard of one array from its format-1 chunks' bytes (a shard already there
    was written whole by an interrupted run and is kept); the number written."""
    arr = cache.array(name)
    grid = arr.cdata_shape
    store = cache.group.store
    prefix = f"{cache.group.path}/{name}" if cache.group.path else name
    written = 0
    for shard in itertools.product(range(math.ceil(grid[0] / cps)), *map(range, grid[1:])):
        key = f"{prefix}/c.{'.'.join(map(str, shard))}"
        if storage.read_ranges(store, [(key, RangeByteRequest(0, 1))])[0] is not None:
            continue
        firsts = range(shard[0] * cps, shard[0] * cps + cps)
        keys = [
            f"{prefix}/{arr.metadata.encode_chunk_key((c, *shard[1:]))}" if c < grid[0] else None
            for c in firsts
        ]
        present = [k for k in keys if k is not None]
        chunks = iter(storage.read_ranges(store, [(k, None) for k in present]))
        blobs = [None if k is None else next(chunks) for k in keys]
        storage.write_key(cache.path, key, shard_bytes(blobs))
        written += 1
    return written


def shard_bytes(chunks: list[bytes | None]) -> bytes:
    """zarr's sharding format with the index at the end: the encoded inner chunks in order,
    then (offset, length) of each as little-endian uint64 (2**64-1 for a chunk not stored),
    then the crc32c of that index."""
    index = np.full((len(chunks), 2), EMPTY, dtype="<u8")
    offset = 0
    for i, blob in enumerate(chunks):
        if blob is not None:
            index[i] = (offset, len(blob))
            offset += len(blob)
    table = index.tobytes()
    crc = google_crc32c.value(table).to_bytes(4, "little")
    return b"".join(b for b in chunks if b is not None) + table + crc


def _switch_metadata(path: str, name: str, cps: int) -> None:
    """Replace an array's zarr.json with its sharded form (one atomic write): the same inner
    chunks and codecs, `cps` chunks deep along the first axis per shard."""
    key = f"{name}/zarr.json"
    meta = json.loads(storage.read_key(path, key))
    inner = meta["chunk_grid"]["configuration"]["chunk_shape"]
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [inner[0] * cps, *inner[1:]]
    meta["codecs"] = [
        {
            "name": "sharding_indexed",
            "configuration": {
                "chunk_shape": inner,
                "codecs": meta["codecs"],
                "index_codecs": [
                    {"name": "bytes", "configuration": {"endian": "little"}},
                    {"name": "crc32c"},
                ],
                "index_location": "end",
            },
        }
    ]
    meta["chunk_key_encoding"] = {
        "name": SHARD_KEY_ENCODING["name"],
        "configuration": {"separator": SHARD_KEY_ENCODING["separator"]},
    }
    storage.write_key(path, key, json.dumps(meta, indent=2).encode())
