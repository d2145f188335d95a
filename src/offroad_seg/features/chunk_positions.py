"""Where each chunk's data belongs. A chunk's own crc32c proves its bytes whole, not that they
are the ones written at its position: two chunks swapped on disk each still pass. So when a data
chunk is committed, the checksums that end its stored chunks are recorded by position (the
`{CHECKSUMS}` array, caches from 0.3 on), and reading or verifying a cache compares them. In a
sharded cache (format 2) the checksums are those of the inner chunks, found through their
shard's index: a chunk moved inside its shard, or to another shard, is caught alike, and
`cache migrate` copies each chunk's bytes unchanged, so the records stay valid."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from offroad_seg.features.cache_format import CHECKSUMS
from offroad_seg.features.chunk_store import chunk_tails

if TYPE_CHECKING:
    from offroad_seg.features.cache import FeatureCache


def record_checksums(cache: FeatureCache, chunks: Sequence[int]) -> list[str]:
    """Record the checksums that end the chunks' stored data, by position; the keys of
    the records written."""
    arr = cache.array(CHECKSUMS)
    chunks = sorted(chunks)
    stored = [cache.stored_chunks(c) for c in chunks]
    tails = chunk_tails(cache.group.store, [s for ss in stored for s in ss])
    per = len(stored[0]) if stored else 0
    rows = np.asarray([t or 0 for t in tails], dtype=np.uint32).reshape(len(chunks), per)
    # one write per run of consecutive chunks: a whole shard of records in format 2
    start = 0
    for i in range(1, len(chunks) + 1):
        if i == len(chunks) or chunks[i] != chunks[i - 1] + 1:
            arr[chunks[start] : chunks[i - 1] + 1] = rows[start:i]
            start = i
    return list(dict.fromkeys(cache.chunk_key(CHECKSUMS, (c, 0)) for c in chunks))


def position_problems(
    cache: FeatureCache, chunks: Sequence[int], skip: set[str] = frozenset()
) -> list[str]:
    """Stored chunks of these data chunks that are not the ones written there: each one's
    checksum is compared with the one recorded for its position (`skip`: keys already
    known to be damaged). A chunk holding another position's data names it."""
    if not cache.has_checksums or not chunks:
        return []
    try:
        recorded = np.asarray(cache.array(CHECKSUMS)[:], dtype=np.uint32)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return [f"{CHECKSUMS}: unreadable ({reason})"]
    coords = [cache.chunk_coords(c) for c in chunks]
    stored = [[cache.locate(n, xy) for n, xy in cs] for cs in coords]
    actual = chunk_tails(cache.group.store, [s for ss in stored for s in ss])
    problems = []
    per = recorded.shape[1]
    for i, chunk in enumerate(chunks):
        for j, ((name, xy), where) in enumerate(zip(coords[i], stored[i], strict=True)):
            want, got = int(recorded[chunk, j]), actual[i * per + j] or 0
            key = where.where()
            if key in skip or not want or not got or want == got:
                continue  # unrecorded, missing (reported elsewhere) or right
            owners = np.argwhere(recorded == got)
            if len(owners):
                other, other_xy = cache.chunk_coords(int(owners[0][0]))[int(owners[0][1])]
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
