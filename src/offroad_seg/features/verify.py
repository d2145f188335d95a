"""`offroad-seg cache verify`: read every chunk of every array of a cache and report what is
damaged (checksums, missing chunks, chunks at the wrong position, done flags, the fingerprint,
the class histogram), naming the array, the chunk and its key in the store (in a sharded cache,
the shard's key and the chunk's place in it: each inner chunk is checked on its own); an
interrupted extraction is reported as unfinished, not as damage."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from offroad_seg.features.cache_format import CHECKSUMS, HACKATHON, SCALES
from offroad_seg.features.chunk_positions import position_problems
from offroad_seg.features.chunk_store import chunk_selection, chunk_tails

if TYPE_CHECKING:
    from offroad_seg.features.cache import FeatureCache


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


def verify_cache(cache: FeatureCache, progress: bool = True) -> VerifyReport:
    """Read every chunk of every array: checksums, presence, done flags, fingerprint and the
    class histogram. Problems name the array, the chunk and its key in the store."""
    report = VerifyReport()
    attrs = cache.attrs
    if attrs.get("fingerprint") != cache.spec.fingerprint:
        report.problems.append("attributes: stored fingerprint does not match the cache's settings")
    done, damaged = _read_every_chunk(cache, report, progress)
    if not any(p.startswith(CHECKSUMS) for p in report.problems):
        finished = [c for c in range(cache.num_chunks) if done[slice(*cache.chunk_range(c))].all()]
        report.problems += position_problems(cache, finished, skip=damaged)
    report.images = cache.num_images
    report.unfinished = int((~done).sum())
    if cache.complete and report.unfinished:
        report.problems.append(
            f"done: {report.unfinished} of {cache.num_images} images are not marked done in a "
            "cache marked complete"
        )
    report.unfinalized = not cache.complete and not report.unfinished
    if cache.complete and not any(
        p.startswith(("labels", "class_pixels")) for p in report.problems
    ):
        stored = np.asarray(cache.array("class_pixels")[:])
        if not np.array_equal(stored, cache.count_class_pixels()):
            report.problems.append("class_pixels: does not match the stored labels")
    return report


def _read_every_chunk(
    cache: FeatureCache, report: VerifyReport, progress: bool
) -> tuple[np.ndarray, set[str]]:
    """Read every stored chunk of every array, adding the missing and unreadable ones to the
    report; the images' done flags as read, and the keys of the damaged chunks. (A data chunk
    is needed only once its images are done: `done` is read first.)"""
    store = cache.group.store
    damaged: set[str] = set()
    done = np.zeros(cache.num_images, dtype=bool)
    arrays = ("done", "names", "class_pixels", "features", "labels", *cache.optional_arrays())
    total = sum(math.prod(cache.array(a).cdata_shape) for a in arrays)
    bar = tqdm(total=total, unit="chunk", desc="verify", disable=None if progress else True)
    for name in arrays:
        arr = cache.array(name)
        grid = list(np.ndindex(*arr.cdata_shape))  # inner chunks, in a sharded array
        places = [cache.locate(name, coords) for coords in grid]
        present = [t is not None for t in chunk_tails(store, places)]
        for coords, place, stored in zip(grid, places, present, strict=True):
            where = place.where()
            bar.update(1)
            report.chunks_checked += 1
            needed = (
                name not in ("features", "labels", SCALES, HACKATHON, CHECKSUMS)
                or done[slice(*cache.chunk_range(coords[0]))].all()
            )
            if name == "class_pixels" and not cache.complete:
                needed = False
            if name == "done" and not cache.complete:
                needed = False  # caches written before 0.2 stored no chunk of False flags
            if not stored:
                if needed:
                    report.problems.append(f"{name} chunk {coords}: missing ({where})")
                    damaged.add(where)
                continue
            try:
                block = arr[chunk_selection(arr, coords)]
            except Exception as e:
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                report.problems.append(f"{name} chunk {coords}: unreadable ({where}): {reason}")
                damaged.add(where)
                continue
            if name == "done":
                k = cache.images_per_chunk
                done[coords[0] * k : coords[0] * k + len(block)] = block
    bar.close()
    return done, damaged
