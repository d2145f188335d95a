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
from collections.abc import Iterator
from pathlib import Path

from offroad_seg.errors import CacheError

LOCK_NAME = ".offroad-seg.lock"


@contextlib.contextmanager
def writer_lock(folder: str | Path, what: str = "extract") -> Iterator[None]:
    """Hold the cache's writer lock for the duration of the block."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(f"{folder}: {_describe_owner(fd)}; wait for it or stop it") from None
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "what": what,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _describe_owner(fd: int) -> str:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return (
            f"another `offroad-seg {owner.get('what', 'extract')}` is writing this cache "
            f"(pid {owner['pid']} on {owner['host']}, since {owner['since']})"
        )
    except (ValueError, KeyError, OSError):
        return "another process is writing this cache"
