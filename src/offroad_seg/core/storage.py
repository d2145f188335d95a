"""Where caches live: a local folder or any fsspec URL (s3://, gs://, memory://, ...).

Remote caches go through zarr's fsspec store. Credentials and endpoints come from the
environment exactly as the storage's own tools read them (for S3: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE, ...); `$OFFROAD_SEG_STORAGE_OPTIONS`
may add fsspec options as JSON (e.g. '{"anon": true}').
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import zarr
from zarr.core.sync import sync

from offroad_seg.errors import CacheError

CachePath = str | Path  # a folder or an fsspec URL (s3://bucket/train.zarr)

log = logging.getLogger(__name__)

# zarr's LocalStore writes NAME to NAME-without-suffix.<uuid4 hex>.partial, then renames it
ZARR_PARTIAL = re.compile(r"^[^.]+(\.[^.]+)*\.[0-9a-f]{32}\.partial$")


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
    with remote_errors(path):
        try:
            return zarr.open_group(path, mode=mode, storage_options=storage_options(path))
        except ImportError as e:
            raise CacheError(
                f"{path}: remote caches need fsspec's driver for this URL ({e}); for S3: "
                'pip install "offroad-seg[s3]"'
            ) from e


@contextlib.contextmanager
def remote_errors(path: CachePath) -> Iterator[None]:
    """Turn a remote storage's failure (no credentials, an unreachable endpoint, an unknown
    protocol, a bad storage option, ...) into one line naming the URL and the cause. Local
    paths pass their errors through: the CLI names an OSError's file itself."""
    path = normalize(path)
    if not is_remote(path):
        yield
        return
    try:
        yield
    except CacheError:
        raise
    except Exception as e:
        raise CacheError(f"{path}: cannot use this storage ({_cause(e)})") from e


def _cause(error: Exception) -> str:
    name = type(error).__name__
    text = str(error).splitlines()[0] if str(error) else ""
    hint = ""
    if name == "NoCredentialsError":
        hint = "; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
    elif name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError"):
        hint = "; check AWS_ENDPOINT_URL and the network"
    elif isinstance(error, TypeError):
        hint = "; check $OFFROAD_SEG_STORAGE_OPTIONS"
    return f"{name}: {text}{hint}" if text else f"{name}{hint}"


def _store(path: str) -> zarr.abc.store.Store:
    """The zarr store at a remote URL (no group needed: creation starts before there is one)."""
    from zarr.storage import FsspecStore

    with remote_errors(path):
        try:
            return FsspecStore.from_url(
                path, storage_options=storage_options(path), read_only=False
            )
        except ImportError as e:
            raise CacheError(
                f"{path}: remote caches need fsspec's driver for this URL ({e}); for S3: "
                'pip install "offroad-seg[s3]"'
            ) from e


def exists(path: CachePath) -> bool:
    """Whether a zarr group (a cache, finished or not) is stored at `path`."""
    return read_key(path, "zarr.json") is not None


def entries(path: CachePath) -> list[str]:
    """The names directly under `path` (files and folders; for object stores the first level
    of keys under the prefix). A missing folder has none; a file is refused."""
    path = normalize(path)
    if is_remote(path):
        store = _store(path)

        async def names() -> list[str]:
            return [name async for name in store.list_dir("")]

        with remote_errors(path):
            return sorted(sync(names()))
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise CacheError(f"{path}: is a file, not a folder; choose a folder for the cache")
    return sorted(e.name for e in folder.iterdir()) if folder.is_dir() else []


def read_key(path: CachePath, key: str) -> bytes | None:
    """The bytes stored under `key` in the cache at `path`, or None when there are none."""
    path = normalize(path)
    if not is_remote(path):
        try:
            return (Path(path) / key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
    from zarr.core.buffer import default_buffer_prototype

    store = _store(path)
    with remote_errors(path):
        buf = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def write_key(path: CachePath, key: str, data: bytes) -> None:
    """Store `data` under `key`, whole or not at all, durably (local: atomic_write, then the
    folder is synced so that the new name survives a power loss)."""
    path = normalize(path)
    if not is_remote(path):
        from offroad_seg.core.atomic import atomic_write

        atomic_write(Path(path) / key, lambda f: f.write(data))
        _fsync(Path(path), directory=True)
        return
    from zarr.core.buffer import default_buffer_prototype

    store = _store(path)
    with remote_errors(path):
        sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def delete_entries(path: CachePath, names: Iterable[str]) -> None:
    """Delete these entries directly under `path` (a file or a whole folder each), in order,
    and nothing else."""
    path = normalize(path)
    names = list(names)
    if is_remote(path):
        store = _store(path)
        with remote_errors(path):
            for name in names:
                sync(store.delete_dir(name))
                sync(store.delete(name))
        return
    folder = Path(path)
    for name in names:
        entry = folder / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    if names and folder.is_dir():
        _fsync(folder, directory=True)


def read_ranges(store: zarr.abc.store.Store, requests: list[tuple[str, Any]]) -> list[bytes | None]:
    """The bytes of each (key, zarr byte request) -- a suffix or a range of a stored object --
    read concurrently; None for a key that is not stored."""
    from zarr.core.buffer import default_buffer_prototype

    prototype = default_buffer_prototype()

    async def read() -> list:
        return await asyncio.gather(
            *(store.get(key, prototype=prototype, byte_range=r) for key, r in requests)
        )

    return [None if buf is None else buf.to_bytes() for buf in sync(read())]


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


def remove_partial_writes(path: CachePath, folders: Iterable[str]) -> None:
    """zarr writes a local chunk to NAME.<uuid>.partial and renames it; a killed writer leaves
    these behind. They are never read, only wasted space. Only the cache's own `folders` (and
    its top level) are searched: a file of the user's is never touched. (Object stores write
    whole objects.)"""
    path = normalize(path)
    if is_remote(path):
        return
    root = Path(path)
    for tmp in root.glob("*.partial"):
        if ZARR_PARTIAL.match(tmp.name):
            tmp.unlink(missing_ok=True)
    for folder in folders:
        for tmp in (root / folder).rglob("*.partial"):
            if ZARR_PARTIAL.match(tmp.name):
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
