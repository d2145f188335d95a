"""Digests: `digest`, the sha256 of an object's canonical JSON that every fingerprint is made
of, and `sources_digest`, which describes a dataset's files (by size and modification time) so
that a feature cache or an evaluation run notices that its dataset was edited."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from offroad_seg.errors import CacheError

# How the sources digest is made (see `sources_digest`); "size": caches written before 0.3.
SOURCES_METHOD = "size+mtime_ns"
SOURCES_METHODS = ("size", SOURCES_METHOD)


def digest(obj: Any) -> str:
    """sha256 of an object's canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def sources_digest(
    entries: Sequence[tuple[str, Path, Path | None]], method: str = SOURCES_METHOD
) -> str:
    """sha256 over each sample's name and its image's and mask's size and modification time
    (ns): a staleness check that costs one stat per file and reads no content (0.05 s
    for 3000 samples; hashing their bytes would read the whole dataset on every resume). Any
    edit through the file system changes the mtime, even one that keeps the size; not noticed:
    new content given back its old mtime on purpose (`touch -r`). A copy that keeps mtimes
    (`cp -p`, `rsync -a`) matches; a plain `cp -r` does not (a resume then asks for
    --overwrite). `method="size"` computes the digest of caches before 0.3 (sizes only)."""
    if method not in SOURCES_METHODS:
        raise CacheError(f"sources digest method {method!r}: expected one of {SOURCES_METHODS}")

    def stamp(path: Path | None) -> list[int] | int | None:
        if path is None:
            return None
        st = os.stat(path)
        return st.st_size if method == "size" else [st.st_size, st.st_mtime_ns]

    return digest([[name, stamp(image), stamp(mask)] for name, image, mask in entries])
