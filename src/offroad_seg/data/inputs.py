"""What predict reads: its input images and videos found from files, folders and globs
(`list_inputs`), refusing inputs whose outputs would share a file name, and the warnings about
inputs the head will see differently from its training data (`input_warnings`, from the
headers only).
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from offroad_seg.core.text import plural, they_are
from offroad_seg.data.dataset import (
    IMAGES_DIR,
    folder_files,
    is_special,
    is_system_file,
    log_not_regular,
)
from offroad_seg.data.images import (
    DEEP_MODES,
    IMAGE_SUFFIXES,
    ImageHeader,
    image_format,
    read_header,
)
from offroad_seg.data.layout import output_layout
from offroad_seg.errors import DataError

log = logging.getLogger(__name__)


VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v"}


@dataclass(frozen=True)
class InputFiles:
    """What `list_inputs` found: images and videos to predict, in the order given (folders and
    globs sorted by name), and the files of folders and globs skipped as neither."""

    images: list[Path]
    videos: list[Path]
    skipped: list[Path]

    def skipped_note(self) -> str:
        """'skipped 2 files that are not PNG/JPEG images or videos (e.g. notes.txt, a.bmp)',
        or '' when nothing was skipped."""
        n = len(self.skipped)
        if n == 0:
            return ""
        if n == 1:
            return (
                f"skipped 1 file that is not a PNG/JPEG image or a video ({self.skipped[0].name})"
            )
        names = ", ".join(p.name for p in self.skipped[:3]) + (", ..." if n > 3 else "")
        return f"skipped {n} files that are not PNG/JPEG images or videos (e.g. {names})"


def _is_glob(item: str | Path) -> bool:
    return any(c in str(item) for c in "*?[") and not Path(item).exists()


def list_inputs(inputs: Iterable[str | Path]) -> InputFiles:
    """Images (PNG, JPEG) and videos (.mp4, .mov, .avi, .mkv, .webm, .m4v) for predict, from
    files, folders and globs.

    - A folder gives its images and videos sorted by name (a dataset folder: its
      `Color_Images/`), not recursing; other files in it are skipped and listed in `skipped`,
      hidden and OS files silently. A folder with neither images nor videos is an error.
    - An argument with `*`, `?` or `[` that is not an existing path is a glob (`**` recurses),
      expanded sorted; matched folders count as folders, matched files as a folder's files.
      A glob that matches nothing is an error naming it.
    - A file named explicitly must be a PNG/JPEG image or a video, by its extension.
    - Two images with the same output name (`x.jpg` and `x.png` -> `x.png`; also one file
      reached twice; in runs nested by folder, `data.layout`, only within one folder) or two
      videos with the same stem are an error naming both.
    """
    found = InputFiles([], [], [])  # its lists grow as the inputs are read, in order
    for item in inputs:
        if _is_glob(item):
            _add_glob(found, item)
            continue
        path = Path(item)
        if path.is_dir():
            _add_folder(found, path)
        elif path.is_file():
            _add_file(found, path, explicit=True)
        elif path.exists():
            raise DataError(f"{path}: not a regular file (a FIFO, socket or device)")
        else:
            raise DataError(f"{path}: no such file or folder")
    if not found.images and not found.videos:
        note = found.skipped_note()
        raise DataError("no input images given" + (f" ({note})" if note else ""))
    _check_output_names(found.images, output_layout(found.images).names)
    _check_output_names(found.videos, [f"{p.stem}_f*.png" for p in found.videos])  # frame_name
    return found


def _add_file(found: InputFiles, path: Path, explicit: bool) -> bool:
    """Add an image or a video, by its extension; any other file is skipped, or an error when
    named explicitly. Whether it was added."""
    suffix = path.suffix.lower()
    kind = (
        found.images if image_format(path) else found.videos if suffix in VIDEO_SUFFIXES else None
    )
    if kind is None:
        if explicit:
            raise DataError(
                f"{path}: not a PNG/JPEG image or a video (expected "
                f"{', '.join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))})"
            )
        found.skipped.append(path)
        return False
    kind.append(path)
    return True


def _add_folder(found: InputFiles, path: Path) -> None:
    """A folder's images and videos (a dataset folder's `Color_Images/`), not recursing; one
    with neither is an error."""
    folder = path / IMAGES_DIR if (path / IMAGES_DIR).is_dir() else path
    before = len(found.skipped)
    added = [_add_file(found, p, explicit=False) for p in folder_files(folder)]
    if not any(added):
        other = len(found.skipped) - before
        hint = f" ({plural(other, 'other file')})" if other else ""
        raise DataError(f"{folder}: no PNG/JPEG images or videos{hint}")


def _add_glob(found: InputFiles, pattern: str | Path) -> None:
    """What a glob matches, sorted: folders as folders, files as a folder's files."""
    matches = [Path(m) for m in sorted(glob.glob(str(pattern), recursive=True))]
    if not matches:
        raise DataError(f"{pattern}: no files match this pattern")
    special = [p for p in matches if is_special(p)]
    log_not_regular([p for p in special if not is_system_file(p)])
    for path in matches:
        if path.is_dir():
            _add_folder(found, path)
        elif not (is_system_file(path) or path in special):
            _add_file(found, path, explicit=False)


def _check_output_names(paths: Sequence[Path], names: Sequence[str]) -> None:
    seen: dict[str, Path] = {}
    for path, name in zip(paths, names, strict=True):
        if name in seen:
            raise DataError(
                f"{path}: outputs would have the same file name ({name}) as those of "
                f"{seen[name]}; rename one or predict them in separate runs"
            )
        seen[name] = path


def list_images(inputs: Iterable[str | Path]) -> list[Path]:
    """The images of `list_inputs` for commands that read no video; skipped files are logged."""
    found = list_inputs(inputs)
    if found.videos:
        raise DataError(f"{found.videos[0]}: a video; this command reads PNG/JPEG images only")
    if found.skipped:
        log.warning(found.skipped_note())
    return found.images


_GRAY_MODES = ("1", "L", "LA", "La")
# input_warnings: an image whose width/height ratio is off the working size's by more than this
# factor (either way) is flagged, since the resize to the working size does not keep it.
ASPECT_TOLERANCE = 1.15


def _examples(items: Sequence[str], shown: int = 3) -> str:
    head = ", ".join(items[:shown])
    return head + (f" and {len(items) - shown} more" if len(items) > shown else "")


def _input_header(path: Path) -> ImageHeader:
    if path.suffix.lower() in VIDEO_SUFFIXES:
        from offroad_seg.data.video import video_info

        info = video_info(path)
        gray = info.pix_fmt.startswith(("gray", "ya8", "monob", "monow"))
        return ImageHeader("L" if gray else "RGB", (info.width, info.height), False, False)
    header = read_header(path, check_format=False)  # PIL reads by content, whatever the name
    if header.mode in DEEP_MODES:
        raise DataError(f"{path}: {header.mode} image; expected 8-bit RGB")
    return header


def input_warnings(
    paths: Sequence[str | Path], working_size: Sequence[int], threads: int = 8
) -> list[str]:
    """One line per kind of input that the head will see differently from its training data,
    naming the first few files and the count, from the headers only (pixels are not decoded;
    threaded like `check_headers`). `working_size` is (rows, cols). Videos are read through
    `video.video_info`.

    - grayscale: modes 1, L, LA (and I/I;16/F, which are refused anyway), and palette images
      whose palette holds only greys; videos with a gray pixel format. An RGB file whose three
      channels happen to be equal is not detected: that needs the pixels.
    - aspect ratio: width/height differs from cols/rows by more than 15% either way
      (ASPECT_TOLERANCE); such images are resized to the working size without keeping the
      aspect ratio, as in training.
    - EXIF rotation: JPEGs with an orientation tag other than 'as stored' are read as stored.

    Raises DataError for a file whose header cannot be read or whose pixels read_image refuses
    (16-bit, float), so that such a file stops a run before it starts.
    """
    from concurrent.futures import ThreadPoolExecutor

    rows, cols = working_size
    with ThreadPoolExecutor(max_workers=threads) as pool:
        headers = list(pool.map(_input_header, [Path(p) for p in paths]))
    gray, stretched, rotated = [], [], []
    for path, h in zip(paths, headers, strict=True):
        if h.mode in _GRAY_MODES or h.gray_palette:
            gray.append(str(path))
        w, ht = h.size
        ratio = (w / ht) / (cols / rows)
        if max(ratio, 1 / ratio) > ASPECT_TOLERANCE:
            stretched.append(f"{path} ({w}x{ht})")
        if h.exif_rotated:
            rotated.append(str(path))
    out = []
    if gray:
        out.append(
            f"{plural(len(gray), 'grayscale input')} ({_examples(gray)}): the head was trained "
            f"on colour images; {they_are(len(gray))} read as RGB with three equal channels "
            "and may score worse"
        )
    if stretched:
        out.append(
            f"{plural(len(stretched), 'input')} with an aspect ratio "
            f"more than {round((ASPECT_TOLERANCE - 1) * 100)}% off the working size "
            f"{rows}x{cols} ({cols / rows:.2f}:1): {_examples(stretched)}; "
            f"{they_are(len(stretched))} resized to {rows}x{cols} without keeping the aspect "
            "ratio, as in training, so shapes look stretched to the model and it may score worse"
        )
    if rotated:
        out.append(
            f"{plural(len(rotated), 'JPEG image')} with an EXIF rotation "
            f"({_examples(rotated)}): {they_are(len(rotated))} read as stored, not rotated upright"
        )
    return out
