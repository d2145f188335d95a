"""Where caches live: a local folder or any fsspec URL (s3://, gs://, memory://, ...).

Remote caches go through zarr's fsspec store. Credentials and endpoints come from the
environment exactly as the storage's own tools read them (for S3: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE, ...); `$OFFROAD_SEG_STORAGE_OPTIONS`
may add fsspec options as JSON (e.g. '{"anon": true}').
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import zarr
from zarr.core.sync import sync

from offroad_seg.errors import CacheError

CachePath = str | Path  # a folder or an fsspec URL (s3://bucket/train.zarr)

log = logging.getLogger(__name__)


def is_remote(path: CachePath) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def normalize(path: CachePath) -> str:
    """A cache location as a string; URLs keep their '//' (pathlib would fold it)."""
    text = str(path)
    return text.removeprefix("file://") if text.startswith("file://") else text


def storage_options(path: CachePath) -> dict[str, Any] | None:
    if not is_remote(path):
        return None
    raw = os.environ.get("OFFROAD_SEG_STORAGE_OPTIONS")
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CacheError(f"$OFFROAD_SEG_STORAGE_OPTIONS is not JSON ({e})") from e
    if not isinstance(options, dict):
        raise CacheError("$OFFROAD_SEG_STORAGE_OPTIONS must be a JSON object")
    return options


def open_group(path: CachePath, mode: str) -> zarr.Group:
    path = normalize(path)
    try:
        return zarr.open_group(path, mode=mode, storage_options=storage_options(path))
    except ImportError as e:
        raise CacheError(
            f"{path}: remote caches need fsspec's driver for this URL ({e}); for S3: "
            'pip install "offroad-seg[s3]"'
        ) from e


def exists(path: CachePath) -> bool:
    """Whether a zarr group (a cache, finished or not) is stored at `path`."""
    path = normalize(path)
    if not is_remote(path):
        return (Path(path) / "zarr.json").is_file()
    try:
        store = open_group(path, mode="r").store
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        return False
    return bool(sync(store.exists("zarr.json")))


def clear(path: CachePath, keep: str | None = None) -> None:
    """Delete everything stored under `path` (except the local file named `keep`)."""
    path = normalize(path)
    if is_remote(path):
        if exists(path):
            store = open_group(path, mode="r+").store
            sync(store.delete_dir(""))
        return
    folder = Path(path)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name == keep:
            continue
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def bytes_stored(path: CachePath, group: zarr.Group) -> int:
    """Bytes of the files under a cache. Locally a file may vanish while we count (the writer
    lock is removed on release, a .partial chunk is renamed): it no longer counts."""
    path = normalize(path)
    if is_remote(path):
        return int(sync(group.store.getsize_prefix(group.path or "")))
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def sync_files(path: CachePath, keys: Iterable[str]) -> None:
    """Make the local files of these store keys durable: fsync each file, then every folder
    from theirs up to the cache's root (zarr renames a new chunk into place, often in a folder
    it just made, and a rename or a new folder survives a power loss only once its parent
    folder is synced). Object stores have their own durability: nothing to do there."""
    path = normalize(path)
    if is_remote(path):
        return
    root = Path(path)
    folders: set[Path] = set()
    for key in keys:
        file = root / key
        _fsync(file, directory=False)
        folder = file.parent
        while folder not in folders:
            folders.add(folder)
            if folder == root:
                break
            folder = folder.parent
    # deepest first: a folder's own entry is synced after what it holds
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        _fsync(folder, directory=True)


def _fsync(path: Path, directory: bool) -> None:
    if directory and os.name != "posix":  # folders cannot be opened (or synced) on Windows
        return
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial_writes(path: CachePath) -> None:
    """zarr writes a local chunk to NAME.<uuid>.partial and renames it; a killed writer leaves
    these behind. They are never read, only wasted space. (Object stores write whole objects.)"""
    path = normalize(path)
    if not is_remote(path):
        for tmp in Path(path).rglob("*.partial"):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def writer_lock(path: CachePath, what: str = "extract") -> Iterator[None]:
    """The local writer lock (see lock.py); object stores have none, so a remote cache relies
    on one writing job at a time (its ranks own disjoint chunks)."""
    path = normalize(path)
    if is_remote(path):
        log.debug("%s: remote cache, no writer lock", path)
        yield
        return
    from offroad_seg.core.lock import writer_lock as local_lock

    with local_lock(path, what):
        yield
