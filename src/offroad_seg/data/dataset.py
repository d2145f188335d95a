"""Dataset layout, predict inputs, the class map and image/mask decoding.

A dataset folder holds `Color_Images/*.png` or `*.jpg` (RGB) and `Segmentation/*.png` (raw class
codes, 16-bit), paired by file stem. The `ClassMap` is the one place that knows which raw code is
which class, its id (0..K-1, table order), name and colour; 255 is the ignore id. Class maps come
built in by name (`default`, `hackathon`) or from a JSON file (`resolve_class_map`).
"""

from __future__ import annotations

import glob
import json
import logging
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from offroad_seg.errors import DataError

log = logging.getLogger(__name__)

IGNORE_ID = 255
IMAGES_DIR = "Color_Images"
MASKS_DIR = "Segmentation"
PNG_SUFFIXES = {".png"}
JPEG_SUFFIXES = {".jpg", ".jpeg"}
IMAGE_SUFFIXES = PNG_SUFFIXES | JPEG_SUFFIXES  # compared lower-case
VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v"}
# Files that operating systems drop into folders; never part of a dataset.
_SYSTEM_FILES = {"thumbs.db", "desktop.ini"}
_OTHER_IMAGE_SUFFIXES = {".bmp", ".tif", ".tiff", ".webp", ".gif"}
# The largest image read, in pixels: 4.3 times an 8K frame (7680x4320) and above 100-megapixel
# cameras, far below a decompression bomb (a 24 KB PNG can declare 20000x10000, which would take
# 600 MB decoded, times the copies that resizing makes, in every worker). Checked from the
# header, before any pixel is decoded. Pillow's own checks (a warning over 89.5 Mpx, an error
# over 179 Mpx) give way to this one message; it cannot be raised above 179 Mpx.
MAX_PIXELS = 144_000_000


@dataclass(frozen=True)
class ClassInfo:
    """One class: its raw code in the masks, its name and its display colour (RGB)."""

    code: int
    name: str
    color: tuple[int, int, int]


_DEFAULT_CLASSES = (
    ClassInfo(0, "Background", (0, 0, 0)),
    ClassInfo(100, "Trees", (34, 139, 34)),
    ClassInfo(200, "Lush Bushes", (0, 255, 0)),
    ClassInfo(300, "Dry Grass", (210, 180, 140)),
    ClassInfo(500, "Dry Bushes", (184, 134, 11)),
    ClassInfo(550, "Ground Clutter", (100, 100, 180)),
    ClassInfo(600, "Flowers", (255, 105, 180)),
    ClassInfo(700, "Logs", (255, 128, 0)),
    ClassInfo(800, "Rocks", (128, 128, 128)),
    ClassInfo(7100, "Landscape", (160, 82, 45)),
    ClassInfo(10000, "Sky", (135, 206, 235)),
)


# The hackathon's starter code: 10 classes, Flowers (600) and any other code become Background.
_HACKATHON_CLASSES = tuple(c for c in _DEFAULT_CLASSES if c.name != "Flowers")


@dataclass(frozen=True)
class ClassMap:
    """Raw mask codes <-> class ids (0..K-1 in table order), names and colours.

    Codes not in the table are an error (or ignore, if asked), unless `fallback_id` is set:
    then they are that class (the hackathon map's Background)."""

    classes: tuple[ClassInfo, ...]
    fallback_id: int | None = None

    def __post_init__(self) -> None:
        if not self.classes:
            raise DataError("class map: no classes")
        if len(self.classes) >= IGNORE_ID:
            raise DataError(f"class map: {len(self.classes)} classes; at most {IGNORE_ID - 1}")
        codes = [c.code for c in self.classes]
        if len(set(codes)) != len(codes):
            raise DataError(f"class map: duplicate codes in {codes}")
        for c in self.classes:
            if not 0 <= c.code <= 65535:
                raise DataError(f"class map: code {c.code} of {c.name!r} is not in 0..65535")
        fallback = self.fallback_id
        if fallback is not None and (
            isinstance(fallback, bool)
            or not isinstance(fallback, int)
            or not 0 <= fallback < len(self.classes)
        ):
            raise DataError(
                f"class map: fallback_id {fallback!r} is not a class id 0..{len(self.classes) - 1}"
            )

    @classmethod
    def default(cls) -> ClassMap:
        return cls(_DEFAULT_CLASSES)

    @classmethod
    def hackathon(cls) -> ClassMap:
        """The hackathon starter's 10 classes; every other code (Flowers too) is Background."""
        return cls(_HACKATHON_CLASSES, fallback_id=0)

    @classmethod
    def from_dict(cls, data: Sequence[dict[str, Any]] | Mapping[str, Any]) -> ClassMap:
        """The inverse of `to_dict`: a list of {code, name, color} entries, or
        {"classes": [...], "fallback_id": id} for a map with a fallback."""
        fallback = None
        if isinstance(data, Mapping):
            if not isinstance(data.get("classes"), list):
                raise DataError('class map: expected {"classes": [...], "fallback_id": id}')
            fallback = data.get("fallback_id")
            data = data["classes"]
        try:
            classes = tuple(
                ClassInfo(int(d["code"]), str(d["name"]), tuple(int(v) for v in d["color"]))
                for d in data
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"class map: each entry needs code, name and color ({e})") from e
        return cls(classes, fallback_id=fallback)

    @classmethod
    def from_json(cls, path: str | Path) -> ClassMap:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: cannot read class map JSON ({e})") from e
        if not isinstance(data, (list, dict)):
            raise DataError(f"{path}: expected a list of {{code, name, color}} entries")
        try:
            return cls.from_dict(data)
        except DataError as e:
            raise DataError(f"{path}: {e}") from e

    def to_dict(self) -> list[dict[str, Any]] | dict[str, Any]:
        """JSON-ready. A map without a fallback is the plain list of entries, exactly as before
        fallbacks existed: it is hashed into the fingerprints of existing caches and heads."""
        classes = [{"code": c.code, "name": c.name, "color": list(c.color)} for c in self.classes]
        if self.fallback_id is None:
            return classes
        return {"classes": classes, "fallback_id": self.fallback_id}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def codes(self) -> np.ndarray:
        return np.array([c.code for c in self.classes], dtype=np.uint16)

    @property
    def palette(self) -> np.ndarray:
        """(K, 3) uint8 colours, indexed by class id."""
        return np.array([c.color for c in self.classes], dtype=np.uint8)

    def lookup_table(self) -> np.ndarray:
        """A 65536-entry table raw code -> id; unknown codes map to the fallback id if the map
        has one, else to 255 (ignore)."""
        unknown = IGNORE_ID if self.fallback_id is None else self.fallback_id
        lut = np.full(65536, unknown, dtype=np.uint8)
        lut[self.codes] = np.arange(self.num_classes, dtype=np.uint8)
        return lut

    def codes_to_ids(
        self, codes: np.ndarray, source: str = "mask", ignore_unknown: bool = False
    ) -> np.ndarray:
        """Map raw codes to ids. Unknown codes are the fallback id if the map has one; else an
        error naming `source`, or 255 if asked."""
        if codes.size and (int(codes.min()) < 0 or int(codes.max()) > 65535):
            raise DataError(f"{source}: mask values outside 0..65535")
        ids = self.lookup_table()[codes.astype(np.int64, copy=False)]
        if not ignore_unknown and self.fallback_id is None:
            unknown = np.unique(codes[ids == IGNORE_ID])
            if unknown.size:
                shown = ", ".join(str(int(c)) for c in unknown[:10])
                raise DataError(
                    f"{source}: unknown class codes {shown} (known: "
                    f"{', '.join(str(int(c)) for c in self.codes)}); "
                    "pass --ignore-unknown-codes to treat them as ignore"
                )
        return ids

    def ids_to_codes(self, ids: np.ndarray) -> np.ndarray:
        """Map ids back to raw codes (uint16); the ignore id maps to 0."""
        table = np.zeros(256, dtype=np.uint16)
        table[: self.num_classes] = self.codes
        return table[ids]

    def color_image(self, ids: np.ndarray) -> Image.Image:
        """(H, W) uint8 ids -> a paletted PIL image in the class colours; ignore is white."""
        table = np.full((256, 3), 255, dtype=np.uint8)
        table[: self.num_classes] = self.palette
        img = Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint8), mode="P")
        img.putpalette(table.ravel().tolist())
        return img

    def colorize(self, ids: np.ndarray) -> np.ndarray:
        """(H, W) ids -> (H, W, 3) uint8 colours; ignore is white. (PIL's palette expansion:
        ~15x faster than a numpy table lookup at 960x540.)"""
        return np.asarray(self.color_image(ids).convert("RGB"))


BUILTIN_CLASS_MAPS: Mapping[str, ClassMap] = MappingProxyType(
    {"default": ClassMap.default(), "hackathon": ClassMap.hackathon()}
)


def resolve_class_map(spec: str | Path | None) -> ClassMap:
    """A class map by built-in name (`default`, `hackathon`) or JSON file; None is `default`.
    A built-in name wins over a file of that name in the working folder (`./default` is the
    file), so a command line means the same wherever it runs."""
    if spec is None:
        return ClassMap.default()
    if isinstance(spec, str) and spec in BUILTIN_CLASS_MAPS:
        return BUILTIN_CLASS_MAPS[spec]
    path = Path(spec)
    if path.is_file():
        return ClassMap.from_json(path)
    raise DataError(
        f"class map {str(spec)!r}: no such file and not a built-in class map "
        f"(built-in: {', '.join(BUILTIN_CLASS_MAPS)})"
    )


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


def _is_system_file(path: Path) -> bool:
    return path.name.startswith(".") or path.name.lower() in _SYSTEM_FILES


def _image_format(path: Path) -> str | None:
    """'PNG' or 'JPEG' from the file name, None for anything else."""
    suffix = path.suffix.lower()
    return "PNG" if suffix in PNG_SUFFIXES else "JPEG" if suffix in JPEG_SUFFIXES else None


def _files(folder: Path) -> list[Path]:
    """The files of a folder, sorted by name, without sub-folders, hidden and OS files. Entries
    that are not regular files (FIFOs, sockets, devices: opening a FIFO waits for a writer,
    forever) are skipped, with one logged line."""
    entries = [p for p in sorted(folder.iterdir()) if not (_is_system_file(p) or p.is_dir())]
    special = [p for p in entries if _is_special(p)]
    _log_not_regular(special)
    return [p for p in entries if p not in special]


def _is_special(path: Path) -> bool:
    """Present but not a regular file or folder (a broken link is not special: reading it
    reports the missing file)."""
    return path.exists() and not (path.is_file() or path.is_dir())


def _log_not_regular(paths: Sequence[Path]) -> None:
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
    files = _files(folder)
    by_format: dict[str, list[Path]] = {"PNG": [], "JPEG": []}
    for path in files:
        fmt = _image_format(path)
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
    files = _files(folder)
    for path in files:
        if _image_format(path) == "JPEG":
            raise DataError(
                f"{path}: JPEG mask; masks must be PNG (JPEG compression is lossy and changes "
                "the class codes)"
            )
        if _image_format(path) != "PNG":
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


# ----------------------------------------------------------------------------- predict inputs


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
      reached twice) or two videos with the same stem are an error naming both.
    """
    images: list[Path] = []
    videos: list[Path] = []
    skipped: list[Path] = []

    def add(path: Path, explicit: bool) -> bool:
        suffix = path.suffix.lower()
        kind = images if _image_format(path) else videos if suffix in VIDEO_SUFFIXES else None
        if kind is None:
            if explicit:
                raise DataError(
                    f"{path}: not a PNG/JPEG image or a video (expected "
                    f"{', '.join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))})"
                )
            skipped.append(path)
            return False
        kind.append(path)
        return True

    def add_folder(path: Path) -> None:
        folder = path / IMAGES_DIR if (path / IMAGES_DIR).is_dir() else path
        before = len(skipped)
        found = [add(p, explicit=False) for p in _files(folder)]
        if not any(found):
            other = len(skipped) - before
            hint = f" ({other} other file{'s' if other != 1 else ''})" if other else ""
            raise DataError(f"{folder}: no PNG/JPEG images or videos{hint}")

    for item in inputs:
        if _is_glob(item):
            matches = [Path(m) for m in sorted(glob.glob(str(item), recursive=True))]
            if not matches:
                raise DataError(f"{item}: no files match this pattern")
            special = [p for p in matches if _is_special(p)]
            _log_not_regular([p for p in special if not _is_system_file(p)])
            for path in matches:
                if path.is_dir():
                    add_folder(path)
                elif not (_is_system_file(path) or path in special):
                    add(path, explicit=False)
            continue
        path = Path(item)
        if path.is_dir():
            add_folder(path)
        elif path.is_file():
            add(path, explicit=True)
        elif path.exists():
            raise DataError(f"{path}: not a regular file (a FIFO, socket or device)")
        else:
            raise DataError(f"{path}: no such file or folder")
    if not images and not videos:
        note = InputFiles(images, videos, skipped).skipped_note()
        raise DataError("no input images given" + (f" ({note})" if note else ""))
    _check_output_names(images, output_name)
    _check_output_names(videos, lambda p: f"{Path(p).stem}_f*.png")  # video.frame_name
    return InputFiles(images, videos, skipped)


def _check_output_names(paths: Sequence[Path], name_of: Callable[[Path], str]) -> None:
    seen: dict[str, Path] = {}
    for path in paths:
        name = name_of(path)
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


# ----------------------------------------------------------------------------- headers


_MASK_MODES = ("I;16", "I;16B", "I;16L", "I", "L", "P")
# Modes read_image refuses: more than 8 bits per channel, which the backbone never saw.
_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I", "F")
_GRAY_MODES = ("1", "L", "LA", "La")
# input_warnings: an image whose width/height ratio is off the working size's by more than this
# factor (either way) is flagged, since the resize to the working size does not keep it.
ASPECT_TOLERANCE = 1.15


@dataclass(frozen=True)
class _Header:
    mode: str
    size: tuple[int, int]  # (width, height)
    gray_palette: bool  # a "P"/"PA" image whose palette holds greys only
    exif_rotated: bool  # an EXIF orientation other than "as stored"


def _read_header(path: Path, check_format: bool = True) -> _Header:
    """The file header, without decoding the pixels. `check_format`: the content must be the
    format its extension names (a JPEG called .png is an error)."""
    try:
        with open_header(path) as img:
            expected = _image_format(path)
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
            return _Header(img.mode, img.size, gray_palette, orientation not in (0, 1))
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from e


def _header(path: Path) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) from the file header, without decoding the pixels."""
    header = _read_header(path)
    return header.mode, header.size


def check_headers(samples: Sequence[Sample], threads: int = 8) -> None:
    """Check every file's header before any work starts: not an image, RGB masks and sizes
    that differ are reported at once instead of hours into an extraction. (Truncated pixel
    data and unknown codes can only be found by decoding; they stop the run when met.)"""
    from concurrent.futures import ThreadPoolExecutor

    def check(sample: Sample) -> None:
        mode, size = _header(sample.image)
        if mode in _DEEP_MODES:
            raise DataError(f"{sample.image}: {mode} image; expected 8-bit RGB")
        if sample.mask is None:
            return
        mask_mode, mask_size = _header(sample.mask)
        if mask_mode not in _MASK_MODES:
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


def _examples(items: Sequence[str], shown: int = 3) -> str:
    head = ", ".join(items[:shown])
    return head + (f" and {len(items) - shown} more" if len(items) > shown else "")


def _input_header(path: Path) -> _Header:
    if path.suffix.lower() in VIDEO_SUFFIXES:
        from offroad_seg.data.video import video_info

        info = video_info(path)
        gray = info.pix_fmt.startswith(("gray", "ya8", "monob", "monow"))
        return _Header("L" if gray else "RGB", (info.width, info.height), False, False)
    header = _read_header(path, check_format=False)  # PIL reads by content, whatever the name
    if header.mode in _DEEP_MODES:
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
            f"{len(gray)} grayscale input{'s' if len(gray) > 1 else ''} ({_examples(gray)}): "
            "the head was trained on colour images; they are read as RGB with three equal "
            "channels and may score worse"
        )
    if stretched:
        out.append(
            f"{len(stretched)} input{'s' if len(stretched) > 1 else ''} with an aspect ratio "
            f"more than {round((ASPECT_TOLERANCE - 1) * 100)}% off the working size "
            f"{rows}x{cols} ({cols / rows:.2f}:1): {_examples(stretched)}; they are resized to "
            f"{rows}x{cols} without keeping the aspect ratio, as in training, so shapes look "
            "stretched to the model and it may score worse"
        )
    if rotated:
        out.append(
            f"{len(rotated)} JPEG image{'s' if len(rotated) > 1 else ''} with an EXIF rotation "
            f"({_examples(rotated)}): they are read as stored, not rotated upright"
        )
    return out


# ----------------------------------------------------------------------------- decoding


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
        if img.mode in _DEEP_MODES:
            raise DataError(f"{path}: {img.mode} image; expected 8-bit RGB")
        img = img.convert("RGB")
    return np.asarray(img)


def read_mask(path: str | Path) -> np.ndarray:
    """Decode a mask of raw class codes to (H, W) int32 (16-bit, 8-bit or 32-bit PNG)."""
    img = _open_image(Path(path))
    if img.mode in _MASK_MODES:
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
