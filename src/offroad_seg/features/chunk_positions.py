"""Where each chunk's data belongs. A chunk's own crc32c proves its bytes whole, not that they
are the ones written at its position: two chunks swapped on disk each still pass. So when a data
chunk is committed, the checksums that end its stored chunks are recorded by position (the
`{CHECKSUMS}` array, caches from 0.3 on), and reading or verifying a cache compares them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from offroad_seg.core import storage
from offroad_seg.features.cache_format import CHECKSUMS

if TYPE_CHECKING:
    from offroad_seg.features.cache import FeatureCache


def record_checksums(cache: FeatureCache, chunks: Sequence[int]) -> list[str]:
    """Record the checksums that end the chunks' stored data, by position; the keys of
    the records written."""
    arr = cache.array(CHECKSUMS)
    keys = [cache.chunk_keys(c) for c in chunks]
    tails = storage.read_checksums(cache.group.store, [k for ks in keys for k in ks])
    per = len(keys[0]) if keys else 0
    for i, chunk in enumerate(chunks):
        arr[chunk] = np.asarray(tails[i * per : (i + 1) * per], dtype=np.uint32)
    return [cache.chunk_key(CHECKSUMS, (c, 0)) for c in chunks]


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
    keys = [[cache.chunk_key(n, xy) for n, xy in cs] for cs in coords]
    actual = storage.read_checksums(cache.group.store, [k for ks in keys for k in ks])
    problems = []
    per = recorded.shape[1]
    for i, chunk in enumerate(chunks):
        for j, ((name, xy), key) in enumerate(zip(coords[i], keys[i], strict=True)):
            want, got = int(recorded[chunk, j]), actual[i * per + j]
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
