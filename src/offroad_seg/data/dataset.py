"""The dataset layout: a dataset folder holds `Color_Images/*.png` or `*.jpg` (RGB) and
`Segmentation/*.png` (raw class codes, 16-bit), paired by file stem into `Sample`s; listing a
folder's files (skipping hidden and OS files and entries that are not regular files) and
checking every file's header before a run starts. The class map is in `classes`, image and
mask decoding in `images`, predict's inputs in `inputs`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from offroad_seg.data.images import (
    DEEP_MODES,
    JPEG_SUFFIXES,
    MASK_MODES,
    image_format,
    read_header,
)
from offroad_seg.errors import DataError

log = logging.getLogger(__name__)

IMAGES_DIR = "Color_Images"
MASKS_DIR = "Segmentation"
# Files that operating systems drop into folders; never part of a dataset.
_SYSTEM_FILES = {"thumbs.db", "desktop.ini"}
_OTHER_IMAGE_SUFFIXES = {".bmp", ".tif", ".tiff", ".webp", ".gif"}


@dataclass(frozen=True)
class Sample:
    """One dataset entry: an image and (for labelled data) its mask."""

    name: str
    image: Path
    mask: Path | None

    @property
    def output_name(self) -> str:
        """The file name of this image's per-image outputs (always PNG): `x.jpg` -> `x.png`."""
        return output_name(self.name)


def output_name(path: str | Path) -> str:
    """The file name of an image's per-image outputs (masks, overlays): its stem plus `.png`,
    since outputs are PNG whatever the input format (`x.jpg` -> `x.png`)."""
    return Path(path).stem + ".png"


def is_system_file(path: Path) -> bool:
    """Hidden files and the files operating systems drop into folders."""
    return path.name.startswith(".") or path.name.lower() in _SYSTEM_FILES


def folder_files(folder: Path) -> list[Path]:
    """The files of a folder, sorted by name, without sub-folders, hidden and OS files. Entries
    that are not regular files (FIFOs, sockets, devices: opening a FIFO waits for a writer,
    forever) are skipped, with one logged line."""
    entries = [p for p in sorted(folder.iterdir()) if not (is_system_file(p) or p.is_dir())]
    special = [p for p in entries if is_special(p)]
    log_not_regular(special)
    return [p for p in entries if p not in special]


def is_special(path: Path) -> bool:
    """Present but not a regular file or folder (a broken link is not special: reading it
    reports the missing file)."""
    return path.exists() and not (path.is_file() or path.is_dir())


def log_not_regular(paths: Sequence[Path]) -> None:
    if paths:
        names = ", ".join(str(p) for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
        log.warning(
            "skipped %d %s that %s not a regular file (a FIFO, socket or device): %s",
            len(paths),
            "entry" if len(paths) == 1 else "entries",
            "is" if len(paths) == 1 else "are",
            names,
        )


def _unexpected(path: Path, allowed: str) -> DataError:
    suffix = path.suffix.lower()
    kind = "image" if suffix in _OTHER_IMAGE_SUFFIXES | JPEG_SUFFIXES else "file"
    return DataError(f"{path}: unexpected {kind}; dataset folders hold only {allowed} files")


def list_dataset_images(folder: Path) -> list[Path]:
    """The images of a dataset's `Color_Images/`: all PNG or all JPEG (.jpg/.jpeg, any case),
    sorted by name. Hidden and OS files are skipped; any other file, or a mix of PNG and JPEG,
    is an error naming the odd file out."""
    files = folder_files(folder)
    by_format: dict[str, list[Path]] = {"PNG": [], "JPEG": []}
    for path in files:
        fmt = image_format(path)
        if fmt is None:
            raise _unexpected(path, "PNG or JPEG")
        by_format[fmt].append(path)
    png, jpeg = by_format["PNG"], by_format["JPEG"]
    if png and jpeg:
        odd, fmt = (jpeg[0], "JPEG") if len(jpeg) <= len(png) else (png[0], "PNG")
        raise DataError(
            f"{odd}: unexpected image; {folder} mixes {len(png)} PNG and {len(jpeg)} JPEG images "
            f"(this is {fmt}); a dataset keeps one format"
        )
    return files


def list_masks(folder: Path) -> list[Path]:
    """The masks of a dataset's `Segmentation/`: PNG only (JPEG is refused by name: its lossy
    compression changes the class codes at every region border)."""
    files = folder_files(folder)
    for path in files:
        if image_format(path) == "JPEG":
            raise DataError(
                f"{path}: JPEG mask; masks must be PNG (JPEG compression is lossy and changes "
                "the class codes)"
            )
        if image_format(path) != "PNG":
            raise _unexpected(path, "PNG mask")
    return files


def _by_stem(paths: Sequence[Path]) -> dict[str, Path]:
    """stem -> path; two files with the same stem (x.jpg and x.jpeg) would write the same
    outputs and pair with the same mask, so they are an error naming both."""
    out: dict[str, Path] = {}
    for path in paths:
        if path.stem in out:
            raise DataError(
                f"{path}: same name as {out[path.stem]} but for the extension; their masks and "
                "outputs would collide"
            )
        out[path.stem] = path
    return out


def list_samples(data_dir: str | Path, require_masks: bool = True) -> list[Sample]:
    """Pair `Color_Images/*` (PNG or JPEG) with `Segmentation/*.png` by file stem
    (`x.jpg` <-> `x.png`), sorted by image name."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: dataset folder does not exist")
    image_dir = data_dir / IMAGES_DIR
    mask_dir = data_dir / MASKS_DIR
    if not image_dir.is_dir():
        raise DataError(
            f"{data_dir}: no {IMAGES_DIR}/ folder (expected {IMAGES_DIR}/ and {MASKS_DIR}/)"
        )
    images = list_dataset_images(image_dir)
    if not images:
        raise DataError(f"{image_dir}: no PNG images and no JPEG images")
    stems = _by_stem(images)
    if not require_masks:
        masks = _by_stem(list_masks(mask_dir)) if mask_dir.is_dir() else {}
        return [Sample(p.name, p, masks.get(p.stem)) for p in images]
    if not mask_dir.is_dir():
        raise DataError(f"{data_dir}: no {MASKS_DIR}/ folder with the masks")
    masks = _by_stem(list_masks(mask_dir))
    for path in images:
        if path.stem not in masks:
            raise DataError(f"{path}: no mask {mask_dir / output_name(path)}")
    for stem, path in masks.items():
        if stem not in stems:
            raise DataError(f"{path}: mask without an image {image_dir / stem}.*")
    return [Sample(p.name, p, masks[p.stem]) for p in images]


# ----------------------------------------------------------------------------- headers


def _header(path: Path) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) from the file header, without decoding the pixels."""
    header = read_header(path)
    return header.mode, header.size


def check_headers(samples: Sequence[Sample], threads: int = 8) -> None:
    """Check every file's header before any work starts: not an image, RGB masks and sizes
    that differ are reported at once instead of hours into an extraction. (Truncated pixel
    data and unknown codes can only be found by decoding; they stop the run when met.)"""
    from concurrent.futures import ThreadPoolExecutor

    def check(sample: Sample) -> None:
        mode, size = _header(sample.image)
        if mode in DEEP_MODES:
            raise DataError(f"{sample.image}: {mode} image; expected 8-bit RGB")
        if sample.mask is None:
            return
        mask_mode, mask_size = _header(sample.mask)
        if mask_mode not in MASK_MODES:
            raise DataError(
                f"{sample.mask}: {mask_mode} mask; expected a single-channel PNG of raw class "
                "codes (16-bit)"
            )
        if mask_size != size:
            raise DataError(
                f"{sample.mask}: mask is {mask_size[0]}x{mask_size[1]} but its image is "
                f"{size[0]}x{size[1]}"
            )

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(check, samples):  # re-raises the first failure, in order
            pass
