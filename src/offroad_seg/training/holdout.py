"""Validation images stay out of training: a head validated on images it was trained on gets
scores that mean nothing, and nothing in the numbers says so.

A validation cache is refused when it is a training cache (the same location), or when it holds
images of a training cache: the same file name with the same labels (the cached view-0 masks
when both caches have one working size; the hackathon-protocol labels, stored at one size by
every cache, when they differ; the names alone for caches of other sizes made before 0.2) — a
cache extracted again from the same folder, or a
copy. Files of the same name in two different datasets have different masks and pass. A
training cache whose location looks like validation data (a `val`, `valid`, `validation` or
`test` part) is allowed, with a warning: it may be a training set that is named so, or it may be
a validation set passed by mistake as a second training cache.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from offroad_seg.core import storage
from offroad_seg.errors import CacheError
from offroad_seg.features.cache import FeatureCache
from offroad_seg.features.cache_format import HACKATHON

log = logging.getLogger(__name__)

VALIDATION_WORDS = frozenset({"val", "valid", "validation", "test"})
# at most this many shared names are compared by their labels (each costs one label read per
# cache; names shared by chance between two datasets can be thousands)
COMPARED_NAMES = 64


def check_holdout(caches: list[FeatureCache], val: FeatureCache | None) -> None:
    """Refuse a validation cache that holds training images; warn about training caches
    that look like validation data. Caches must share their features (checked before)."""
    for cache in caches:
        warn_if_validation_like(cache)
    if val is None:
        return
    for cache in caches:
        if same_location(cache.path, val.path):
            raise CacheError(
                f"{val.path}: is also a training cache; validate on images the head is not "
                "trained on (another split's cache)"
            )
        shared = shared_images(cache, val)
        if shared:
            more = f" and {len(shared) - 1} more" if len(shared) > 1 else ""
            raise CacheError(
                f"{val.path}: holds images of the training cache {cache.path} ({shared[0]}"
                f"{more}); validate on images the head is not trained on"
            )


def same_location(a: str, b: str) -> bool:
    if storage.is_remote(a) or storage.is_remote(b):
        return storage.normalize(a).rstrip("/") == storage.normalize(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def shared_images(train: FeatureCache, val: FeatureCache) -> list[str]:
    """Names of `val` images that are `train` images: same name, same view-0 labels (up to
    COMPARED_NAMES names, evenly spread, are compared)."""
    names = sorted(set(train.spec.names) & set(val.spec.names))
    if not names:
        return []
    if len(names) > COMPARED_NAMES:
        names = [names[i] for i in np.linspace(0, len(names) - 1, COMPARED_NAMES).astype(int)]
    array = "labels"
    if train.spec.preprocessing.size != val.spec.preprocessing.size:
        if train.hackathon_size is None or train.hackathon_size != val.hackathon_size:
            return names  # labels of other sizes cannot be compared: the names must do
        array = HACKATHON
    a = _labels(train, [train.spec.names.index(n) for n in names], array)
    b = _labels(val, [val.spec.names.index(n) for n in names], array)
    return [n for n, x, y in zip(names, a, b, strict=True) if np.array_equal(x, y)]


def _labels(cache: FeatureCache, indices: list[int], array: str = "labels") -> np.ndarray:
    """View-0 labels (or the hackathon-protocol labels) of some images, in the order given."""
    order = np.argsort(indices)
    try:
        stored = cache.array(array)
        if array == "labels":
            rows = stored.oindex[np.asarray(indices)[order], 0]
        else:
            rows = stored.oindex[np.asarray(indices)[order]]
    except Exception as e:
        raise CacheError(f"{cache.path}: cannot read labels ({type(e).__name__}: {e})") from e
    out = np.empty_like(rows)
    out[order] = rows
    return out


def warn_if_validation_like(cache: FeatureCache) -> None:
    word = validation_word(cache.path)
    if word is not None:
        log.warning(
            "%s: training on a cache whose name says %r: if it holds validation or test "
            "images, pass it as --val-cache instead (a head trained on them scores too high)",
            cache.path,
            word,
        )


def validation_word(path: str) -> str | None:
    """The validation-like word in a cache's location: a folder on its path named val, valid,
    validation or test, or such a word in the cache's own name (val.zarr, cache-val.zarr)."""
    parts = [p for p in re.split(r"[/\\]", storage.normalize(path)) if p]
    if not parts:
        return None
    *folders, name = parts
    for folder in folders:
        if folder.lower() in VALIDATION_WORDS:
            return folder
    stem = name.split(".")[0]
    for word in re.split(r"[^A-Za-z0-9]+", stem):
        if word.lower() in VALIDATION_WORDS:
            return word
    return None
