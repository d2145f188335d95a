"""Atomic file writes: readers see the old file or the whole new one, never a torn one.

Every output that looks complete when present (checkpoints, metrics, stats, images) goes
through `atomic_write`: a hidden temporary file in the destination folder, then `os.replace`.
"""

from __future__ import annotations

import json
import os
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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_png_atomic(path: str | Path, img: Image.Image) -> None:
    """A per-image output (mask, panel, overlay) as PNG at zlib level 1: written once per
    image, where the light level is much faster than the default for slightly larger files."""
    atomic_write(path, lambda f: img.save(f, format="PNG", compress_level=1), durable=False)
