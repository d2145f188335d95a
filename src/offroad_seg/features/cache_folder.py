"""Who owns a cache folder. A creation writes a marker file first and removes it once the cache's
metadata is whole, so a folder is classified (`inspect_target`) as empty, an unfinished
creation of ours (which a rerun redoes), a cache of ours, a damaged cache of ours, or foreign:
anything else, which is never written to or cleared, even with --overwrite. Only the cache's
own entries are ever deleted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from offroad_seg.config import CACHE_VERSION
from offroad_seg.core import storage
from offroad_seg.core.atomic import remove_stale_temps
from offroad_seg.core.lock import LOCK_NAME
from offroad_seg.core.storage import CachePath
from offroad_seg.errors import CacheError
from offroad_seg.features.cache_format import (
    ARRAYS,
    FORMAT,
    OWN_ENTRIES,
)

# Written first when a cache is created and removed once its metadata is whole (the group's
# attributes are written last): a folder holding it is provably an unfinished cache of ours,
# which a rerun may redo. (A finished cache holds only zarr's own files.)
MARKER = ".offroad-seg-cache"


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
    return (
        json.dumps({"format": FORMAT, "version": CACHE_VERSION, "state": "creating"}) + "\n"
    ).encode()


def claim_for_creation(path: str, overwrite: bool) -> None:
    """Make `path` ready for a new cache: refuse a folder that is not ours (and without
    `overwrite` a cache of ours), write the marker, then delete the cache's own entries."""
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


def remove_marker(path: str) -> None:
    """The creation is complete: the folder is a cache."""
    storage.delete_entries(path, [MARKER])


def remove_writer_leftovers(path: str) -> None:
    """What a killed writer of ours left behind in a local cache folder: temporary files and
    partly written zarr files of the cache's own entries."""
    if not storage.is_remote(path):
        remove_stale_temps(path)
        storage.remove_partial_writes(path, OWN_ENTRIES)


def refuse_unless_cache(path: str) -> None:
    """Refuse to open what is not a cache of ours, saying in one line what is there instead
    and what to do about it."""
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
