"""Where a chunk's bytes are in the store. Format 1 stores each chunk under its own key; format 2
packs many chunks into one shard (zarr's sharding codec): the shard's key ends with an index of
(offset, length) per inner chunk, so one chunk is found with two small ranged reads (the index,
then the chunk) and its crc32c, the chunk's last 4 bytes, with one more. Everything here reads
an array's layout from its own metadata, so a cache whose arrays are part-way through
`cache migrate` (some sharded, some not) is still read correctly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import google_crc32c
import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest, SuffixByteRequest

from offroad_seg.core import storage

# zarr's sharding codec marks an inner chunk that is not stored with this offset and length
EMPTY = 2**64 - 1
INDEX_ENTRY_BYTES = 16  # (offset, length), two little-endian uint64
INDEX_CHECKSUM_BYTES = 4  # the index's own crc32c (index_codecs: bytes, crc32c)


@dataclass(frozen=True)
class StoredChunk:
    """A chunk's place in the store: the key holding it and, in a sharded array, its position
    in that shard's index (C order over the shard's chunks) and the shard's chunk count."""

    key: str
    inner: int | None = None
    per_shard: int = 1

    def where(self) -> str:
        """The key, and for a sharded array the chunk's place in the shard (for messages)."""
        return self.key if self.inner is None else f"{self.key}, inner chunk {self.inner}"


def chunks_per_shard(arr: zarr.Array) -> tuple[int, ...] | None:
    """Inner chunks along each axis of one shard; None for an unsharded array."""
    if arr.shards is None:
        return None
    return tuple(s // c for s, c in zip(arr.shards, arr.chunks, strict=True))


def locate(prefix: str, arr: zarr.Array, coords: tuple[int, ...]) -> StoredChunk:
    """Where the chunk at `coords` (in the array's chunk grid) of the array stored under
    `prefix` (its path in the store, e.g. "features") is."""
    per = chunks_per_shard(arr)
    if per is None:
        return StoredChunk(f"{prefix}/{arr.metadata.encode_chunk_key(coords)}")
    shard = tuple(c // p for c, p in zip(coords, per, strict=True))
    inner = int(np.ravel_multi_index(tuple(c % p for c, p in zip(coords, per, strict=True)), per))
    return StoredChunk(f"{prefix}/{arr.metadata.encode_chunk_key(shard)}", inner, math.prod(per))


def chunk_selection(arr: zarr.Array, coords: tuple[int, ...]) -> tuple[slice, ...]:
    """The array region of one chunk (an inner chunk, in a sharded array)."""
    return tuple(slice(c * s, (c + 1) * s) for c, s in zip(coords, arr.chunks, strict=True))


def shard_index(raw: bytes, per_shard: int) -> np.ndarray | None:
    """(per_shard, 2) offsets and lengths from a shard's tail, or None when the tail is not a
    whole index with its checksum (a damaged or truncated shard)."""
    want = per_shard * INDEX_ENTRY_BYTES + INDEX_CHECKSUM_BYTES
    if len(raw) != want:
        return None
    table, crc = raw[:-INDEX_CHECKSUM_BYTES], raw[-INDEX_CHECKSUM_BYTES:]
    if google_crc32c.value(table) != int.from_bytes(crc, "little"):
        return None
    return np.frombuffer(table, dtype="<u8").reshape(per_shard, 2)


def chunk_tails(store: zarr.abc.store.Store, chunks: list[StoredChunk]) -> list[int | None]:
    """The crc32c that ends each chunk's stored bytes (zarr's crc32c codec appends it), None
    for a chunk that is not stored, 0 for one in a shard whose index is damaged (stored, but
    unreadable: reading it names the damage). Shard indexes are read once per shard, then
    every chunk's last 4 bytes, each batch of reads concurrently."""
    shards = sorted({(c.key, c.per_shard) for c in chunks if c.inner is not None})
    suffix = [
        (key, SuffixByteRequest(per * INDEX_ENTRY_BYTES + INDEX_CHECKSUM_BYTES))
        for key, per in shards
    ]
    # per shard: its index; None when the shard is not stored; False when its index is damaged
    indexes: dict[str, np.ndarray | bool | None] = {}
    for (key, per), raw in zip(shards, storage.read_ranges(store, suffix), strict=True):
        index = None if raw is None else shard_index(raw, per)
        indexes[key] = False if raw is not None and index is None else index
    requests: list[tuple[str, object] | int | None] = []  # a read, or the answer itself
    for chunk in chunks:
        if chunk.inner is None:
            requests.append((chunk.key, SuffixByteRequest(4)))
            continue
        index = indexes[chunk.key]
        if index is None or index is False:  # not stored; stored but unreadable
            requests.append(None if index is None else 0)
            continue
        offset, length = map(int, index[chunk.inner])
        if offset == EMPTY:
            requests.append(None)
        elif length < 4:
            requests.append(0)
        else:
            requests.append((chunk.key, RangeByteRequest(offset + length - 4, offset + length)))
    reads = [r for r in requests if isinstance(r, tuple)]
    raws = iter(storage.read_ranges(store, reads))
    out: list[int | None] = []
    for request in requests:
        if not isinstance(request, tuple):
            out.append(request)
            continue
        raw = next(raws)
        out.append(None if raw is None else int.from_bytes(raw, "little") if len(raw) == 4 else 0)
    return out
