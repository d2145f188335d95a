"""An exclusive writer lock for a cache folder, released by the kernel when its owner dies.

`fcntl.flock` on a file inside the cache: a second writer is refused with the owner's pid,
host and start time; a crashed or killed owner (even by SIGKILL) leaves no stale lock, because
the kernel drops the lock with the process. Advisory locks are local to a machine (and not
reliable on every network file system); remote object stores have no lock at all, which the
distributed extractor avoids by giving each rank its own chunks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from offroad_seg.errors import CacheError

LOCK_NAME = ".offroad-seg.lock"


@contextlib.contextmanager
def writer_lock(folder: str | Path, what: str = "extract") -> Iterator[None]:
    """Hold the cache's writer lock for the duration of the block.

    The lock file is removed on release, so a finished cache holds only zarr's own files (plain
    `zarr.open_group` warns about anything else); a killed owner leaves it behind, unlocked,
    until the next run.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = _acquire(path, lambda fd: f"{folder}: {_describe_owner(fd)}; wait for it or stop it")
    try:
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "what": what,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        yield
    finally:
        _release(path, fd)


@contextlib.contextmanager
def section_lock(path: str | Path) -> Iterator[None]:
    """Wait for, then hold, an exclusive lock on `path` for a short section that a machine's
    processes take turns at (a sweep's study bookkeeping). The file is removed on release, as
    `writer_lock`'s is, so none is left behind once nobody holds it; a waiter that opened the
    removed file notices and takes the new one."""
    fd = _acquire(Path(path), None)
    try:
        yield
    finally:
        _release(Path(path), fd)


def _release(path: Path, fd: int) -> None:
    """Remove the lock file, then unlock and close it. Unlinking while still holding the lock
    means a waiter that opened this file sees, once it gets the lock, that the path no longer
    names it, and starts over (`_acquire`)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _acquire(path: Path, refuse: Callable[[int], str] | None) -> int:
    """Open and lock the lock file that `path` names when the lock is taken. `refuse`: the
    message to raise if another process holds it (None: wait for it)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if refuse else 0))
        except BlockingIOError:
            message = refuse(fd) if refuse else f"{path}: locked"
            os.close(fd)
            raise CacheError(message) from None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and current.st_ino == os.fstat(fd).st_ino:
            return fd
        os.close(fd)  # the previous owner removed this file as we locked it: take the new one


def _describe_owner(fd: int) -> str:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
        what = owner.get("what", "extract")
        return (
            f"another `offroad-seg {what}` is writing this {_FOLDER_OF.get(what, 'folder')} "
            f"(pid {owner['pid']} on {owner['host']}, since {owner['since']})"
        )
    except (ValueError, KeyError, OSError):
        return "another process is writing this folder"


_FOLDER_OF = {"extract": "cache", "train": "run folder"}  # what each command's lock guards
