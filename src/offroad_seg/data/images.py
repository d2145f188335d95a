"""Image and mask files: reading headers (format, mode, size, EXIF rotation) without decoding,
refusing images over `MAX_PIXELS` before any pixel is decoded, decoding images to RGB and
masks to raw class codes (and class ids), and writing masks as 16-bit PNGs.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from offroad_seg.data.classes import ClassMap
from offroad_seg.errors import DataError

PNG_SUFFIXES = {".png"}
JPEG_SUFFIXES = {".jpg", ".jpeg"}
IMAGE_SUFFIXES = PNG_SUFFIXES | JPEG_SUFFIXES  # compared lower-case
# The largest image read, in pixels: 4.3 times an 8K frame (7680x4320) and above 100-megapixel
# cameras, far below a decompression bomb (a 24 KB PNG can declare 20000x10000, which would take
# 600 MB decoded, times the copies that resizing makes, in every worker). Checked from the
# header, before any pixel is decoded. Pillow's own checks (a warning over 89.5 Mpx, an error
# over 179 Mpx) give way to this one message; it cannot be raised above 179 Mpx.
MAX_PIXELS = 144_000_000
# What a mask of raw class codes may be stored as: one channel, 16 or 8 bits (or a palette
# image, whose indices are the codes).
MASK_MODES = ("I;16", "I;16B", "I;16L", "I", "L", "P")
# Modes read_image refuses: more than 8 bits per channel, which the backbone never saw.
DEEP_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


def image_format(path: Path) -> str | None:
    """'PNG' or 'JPEG' from the file name, None for anything else."""
    suffix = path.suffix.lower()
    return "PNG" if suffix in PNG_SUFFIXES else "JPEG" if suffix in JPEG_SUFFIXES else None


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says, read without decoding its pixels."""

    mode: str
    size: tuple[int, int]  # (width, height)
    gray_palette: bool  # a "P"/"PA" image whose palette holds greys only
    exif_rotated: bool  # an EXIF orientation other than "as stored"


def read_header(path: Path, check_format: bool = True) -> ImageHeader:
    """The file header, without decoding the pixels. `check_format`: the content must be the
    format its extension names (a JPEG called .png is an error)."""
    try:
        with open_header(path) as img:
            expected = image_format(path)
            # cameras' multi-picture JPEGs open as MPO; their first picture is a plain JPEG
            fmt = "JPEG" if img.format == "MPO" else img.format
            if check_format and expected and fmt != expected:
                raise DataError(
                    f"{path}: a {img.format} file with a {path.suffix} name; expected {expected}"
                )
            gray_palette = False
            if img.mode in ("P", "PA"):
                rgb = np.asarray(img.getpalette("RGB") or [], dtype=np.int16).reshape(-1, 3)
                gray_palette = bool(rgb.size) and bool((rgb == rgb[:, :1]).all())
            orientation = img.getexif().get(0x0112, 1) if fmt == "JPEG" else 1
            return ImageHeader(img.mode, img.size, gray_palette, orientation not in (0, 1))
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from e


def open_header(path: Path) -> Image.Image:
    """`Image.open` (reads the header only), refusing an image over `MAX_PIXELS` in one line
    before any pixel is decoded."""
    with warnings.catch_warnings():
        # Pillow warns over 89.5 Mpx and fails over 179 Mpx: MAX_PIXELS decides, in one message
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as e:
            pixels = re.search(r"\((\d+) pixels\)", str(e))
            size = f"{pixels[1]} pixels" if pixels else f"over {MAX_PIXELS} pixels"
            raise DataError(_too_large(path, size)) from e
    width, height = img.size
    if width * height > MAX_PIXELS:
        img.close()
        raise DataError(_too_large(path, f"{width}x{height} = {width * height} pixels"))
    return img


def _too_large(path: Path, size: str) -> str:
    return (
        f"{path}: image too large ({size}; the limit is {MAX_PIXELS}, 4.3 times an 8K "
        "frame): not decoded (a decompression bomb?)"
    )


def _open_image(path: Path) -> Image.Image:
    try:
        img = open_header(path)
        img.load()
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from e
    return img


def read_image(path: str | Path) -> np.ndarray:
    """Decode a PNG or JPEG file to (H, W, 3) uint8 RGB; grayscale, palette and alpha images
    are converted (alpha dropped), 16-bit and float images refused."""
    img = _open_image(Path(path))
    if img.mode != "RGB":
        if img.mode in DEEP_MODES:
            raise DataError(f"{path}: {img.mode} image; expected 8-bit RGB")
        img = img.convert("RGB")
    return np.asarray(img)


def read_mask(path: str | Path) -> np.ndarray:
    """Decode a mask of raw class codes to (H, W) int32 (16-bit, 8-bit or 32-bit PNG)."""
    img = _open_image(Path(path))
    if img.mode in MASK_MODES:
        # "P" masks hold codes as palette indices; the index is the code.
        return np.asarray(img).astype(np.int32, copy=False)
    raise DataError(
        f"{path}: {img.mode} mask; expected a single-channel PNG of raw class codes (16-bit)"
    )


def read_labels(path: str | Path, class_map: ClassMap, ignore_unknown: bool = False) -> np.ndarray:
    """Decode a mask and map its codes to class ids (uint8, 255 = ignore)."""
    return class_map.codes_to_ids(read_mask(path), source=str(path), ignore_unknown=ignore_unknown)


def mask_image(codes: np.ndarray) -> Image.Image:
    """Raw class codes as a 16-bit image (PIL mode I;16), as the dataset stores masks."""
    return Image.fromarray(np.ascontiguousarray(codes, dtype=np.uint16))


def write_mask(path: str | Path, codes: np.ndarray) -> None:
    """Write raw class codes as a 16-bit PNG, as the dataset stores them."""
    mask_image(codes).save(path)
