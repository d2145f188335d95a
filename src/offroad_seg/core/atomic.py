"""Atomic file writes: readers see the old file or the whole new one, never a torn one.

Every output that looks complete when present (checkpoints, metrics, stats, images) goes
through `atomic_write`: a hidden temporary file in the destination folder, then `os.replace`.
"""

from __future__ import annotations

import json
import os
import re
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from PIL import Image


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], durable: bool = True) -> None:
    """Call `write` on a hidden temporary file next to `path`, then rename it over `path`.
    `durable` also fsyncs the data before the rename (survives power loss, not only a killed
    process); per-image outputs skip it, since thousands of fsyncs cost more than they save.

    The temporary file gets the usual permissions (0666 minus umask), unlike `tempfile`'s 0600,
    which would otherwise end up on the final file. It is removed on failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None:
            # a write through a file object (disk full, ...) names no file: name the output
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def host_tag() -> str:
    """This machine's name as it goes into the names of temporary files and folders: letters,
    digits and dashes, at most 40 characters."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def temp_path(path: str | Path) -> Path:
    """A hidden temporary name next to `path` that says who made it (host and pid), so that
    `remove_stale_temps` can tell a dead writer's leftovers from a live writer's file."""
    path = Path(path)
    return path.with_name(f".{path.name}.{host_tag()}-{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


# .NAME.HOST-PID.HEX.tmp, and the older .NAME.PID.HEX.tmp (no host: this machine assumed)
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:(?P<host>[A-Za-z0-9-]+)-)?(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temporary files (and folders) that `temp_path` named in `folder` whose writer
    is dead: a process of this machine that no longer runs. Leftovers of a killed run go on the
    next run; a live writer's file, or one from another host, is never touched. Returns what was
    removed."""
    import shutil

    folder = Path(folder)
    host = host_tag()
    removed = []
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or (m["host"] not in (None, host)) or pid_alive(int(m["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def write_text_atomic(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_png_atomic(path: str | Path, img: Image.Image) -> None:
    """A per-image output (mask, panel, overlay) as PNG at zlib level 1: written once per
    image, where the light level is much faster than the default for slightly larger files."""
    atomic_write(path, lambda f: img.save(f, format="PNG", compress_level=1), durable=False)
