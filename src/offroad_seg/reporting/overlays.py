"""Image panels built with numpy and PIL, fast enough to run once per image: the comparison
panel (image | ground truth | prediction, captioned, with a class legend) and the prediction
overlay with its legend, which is what predict writes. They return uint8 RGB arrays.

A legend has a swatch per class, and an 'ignore' swatch only where a ground truth with ignored
pixels is shown: a prediction never holds the ignore id, so its legend has no such entry."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from offroad_seg.data.classes import ClassMap

_PANEL_CAPTIONS = ("Image", "Ground truth", "Prediction")
_CAPTION_BG = (40, 40, 40)
_TITLE_BG = (15, 15, 15)
_CAPTION_FG = (255, 255, 255)
_LEGEND_BG = (255, 255, 255)
_LEGEND_FG = (0, 0, 0)
_SWATCH_OUTLINE = (110, 110, 110)
_IGNORE_LABEL = "ignore"
_IGNORE_COLOR = (255, 255, 255)


@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """PIL's built-in font at `size` px (the fixed-size bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError, AttributeError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _font_size(width: int) -> int:
    """Text size for a panel whose images are `width` px wide: legible, not overwhelming."""
    return int(min(26, max(10, round(width / 36))))


def _fitting_size(texts: Sequence[str], width: int, size: int, smallest: int = 7) -> int:
    """The largest font size <= `size` (and >= `smallest`) at which all `texts` fit `width`."""
    while size > smallest and max(_text_width(_font(size), t) for t in texts) > width:
        size -= 1
    return size


def _text_width(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> int:
    return math.ceil(font.getlength(text))


def _line_box(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> tuple[int, int]:
    """(top, height) of the ink of a line of text drawn at y=0."""
    _, top, _, bottom = font.getbbox("Agy|Hb")
    return int(top), int(bottom - top)


def legend_entries(
    class_map: ClassMap, ignore: bool = False
) -> list[tuple[str, tuple[int, int, int]]]:
    """(name, colour) of each swatch of a legend: every class, then 'ignore' when `ignore`."""
    entries = [
        (info.name, (int(info.color[0]), int(info.color[1]), int(info.color[2])))
        for info in class_map.classes
    ]
    if ignore:
        entries.append((_IGNORE_LABEL, _IGNORE_COLOR))
    return entries


class _LegendGeometry(NamedTuple):
    pad: int
    swatch: int
    gap: int
    row_height: int
    positions: list[tuple[int, int]]  # top-left of each entry's swatch
    height: int


@lru_cache(maxsize=8)
def _legend_geometry(
    total_width: int, class_map: ClassMap, size: int, ignore: bool
) -> _LegendGeometry:
    font = _font(size)
    _, line_h = _line_box(font)
    pad = max(3, size // 3)
    swatch = max(8, line_h)
    gap = max(3, size // 3)
    spacing = max(8, size)
    row_height = max(swatch, line_h) + pad
    x, y = pad, pad
    positions = []
    for name, _ in legend_entries(class_map, ignore):
        w = swatch + gap + _text_width(font, name)
        if x > pad and x + w > total_width - pad:
            x, y = pad, y + row_height
        positions.append((x, y))
        x += w + spacing
    return _LegendGeometry(pad, swatch, gap, row_height, positions, y + row_height)


class PanelLayout(NamedTuple):
    """Geometry of a `comparison_panel`, in pixels.

    The panel is `header + H` + `legend` rows tall and `3 * W` wide; image k (0 = image,
    1 = ground truth, 2 = prediction) occupies rows `header:header + H`, columns `k*W:(k+1)*W`.
    `header` is the optional title bar plus the caption bar.
    """

    header: int
    legend: int
    height: int
    width: int


def panel_layout(
    image_shape: tuple[int, ...],
    class_map: ClassMap,
    title: str | None = None,
    ignore: bool = True,
) -> PanelLayout:
    """The `PanelLayout` of a `comparison_panel` for images of `image_shape` (H, W[, 3])."""
    h, w = int(image_shape[0]), int(image_shape[1])
    size = _font_size(w)
    _, line_h = _line_box(_font(size))
    bar = line_h + 2 * max(3, size // 3)
    header = bar * (2 if title else 1)
    legend = _legend_geometry(3 * w, class_map, size, ignore).height
    return PanelLayout(header=header, legend=legend, height=header + h + legend, width=3 * w)


@lru_cache(maxsize=16)
def _text_bar(
    width: int,
    height: int,
    text: str,
    size: int,
    center: bool,
    background: tuple[int, int, int] = _CAPTION_BG,
) -> np.ndarray:
    """A (height, width, 3) caption bar with `text`, centred if it fits, else left and clipped."""
    font = _font(size)
    top, line_h = _line_box(font)
    img = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(img)
    tw = _text_width(font, text)
    pad = max(3, size // 3)
    x = (width - tw) // 2 if center and tw <= width - 2 else pad
    draw.text((x, (height - line_h) // 2 - top), text, font=font, fill=_CAPTION_FG)
    arr = np.array(img)
    arr.flags.writeable = False  # cached and shared
    return arr


def _check_rgb(name: str, arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{name}: expected an (H, W, 3) uint8 array, got {arr.shape} {arr.dtype}")
    return arr


def comparison_panel(
    image: np.ndarray,
    truth_rgb: np.ndarray,
    pred_rgb: np.ndarray,
    class_map: ClassMap,
    title: str | None = None,
    ignore: bool = True,
) -> np.ndarray:
    """Image | ground truth | prediction side by side, as one (H', 3W, 3) uint8 RGB array.

    The three inputs are (H, W, 3) uint8 arrays of the same size (colour masks from
    `ClassMap.colorize`). Above them: an optional `title` bar, then a dark caption bar naming
    each column; below them: a legend strip with a swatch and the name of every class, plus
    'ignore' (white) when `ignore` (pass whether the truth has ignored pixels), wrapped to the
    panel width. The images are copied unchanged, without
    gaps; `panel_layout` gives the exact offsets. Text scales with W (PIL's built-in font).
    The caller saves the result, e.g. with `save_png`.
    """
    image = _check_rgb("image", image)
    truth_rgb = _check_rgb("truth_rgb", truth_rgb)
    pred_rgb = _check_rgb("pred_rgb", pred_rgb)
    if not image.shape == truth_rgb.shape == pred_rgb.shape:
        raise ValueError(
            f"comparison_panel: image {image.shape}, truth {truth_rgb.shape} and prediction "
            f"{pred_rgb.shape} differ in size"
        )
    h, w = image.shape[:2]
    layout = panel_layout(image.shape, class_map, title, ignore)
    size = _font_size(w)
    panel = np.empty((layout.height, layout.width, 3), dtype=np.uint8)

    y = 0
    bar = layout.header // (2 if title else 1)
    if title:
        panel[:bar] = _text_bar(layout.width, bar, title, size, center=False, background=_TITLE_BG)
        y = bar
    caption_size = _fitting_size(_PANEL_CAPTIONS, w - 4, size)
    for k, (caption, arr) in enumerate(
        zip(_PANEL_CAPTIONS, (image, truth_rgb, pred_rgb), strict=True)
    ):
        panel[y : y + bar, k * w : (k + 1) * w] = _text_bar(
            w, bar, caption, caption_size, center=True
        )
        panel[layout.header : layout.header + h, k * w : (k + 1) * w] = arr
    if w > 1:  # thin separators between the captions
        panel[y : y + bar, w - 1 : w + 1] = 90
        panel[y : y + bar, 2 * w - 1 : 2 * w + 1] = 90
    panel[layout.header + h :] = _legend_strip(layout.width, class_map, size, ignore)
    return panel


@lru_cache(maxsize=8)
def _legend_strip(width: int, class_map: ClassMap, size: int, ignore: bool) -> np.ndarray:
    """The legend strip (cached: it is the same for every panel of one size and class map)."""
    geo = _legend_geometry(width, class_map, size, ignore)
    font = _font(size)
    top, line_h = _line_box(font)
    img = Image.new("RGB", (width, geo.height), _LEGEND_BG)
    draw = ImageDraw.Draw(img)
    entries = legend_entries(class_map, ignore)
    for (name, color), (x, y) in zip(entries, geo.positions, strict=True):
        draw.rectangle(
            (x, y, x + geo.swatch - 1, y + geo.swatch - 1), fill=color, outline=_SWATCH_OUTLINE
        )
        ty = y + (geo.swatch - line_h) // 2 - top
        draw.text((x + geo.swatch + geo.gap, ty), name, font=font, fill=_LEGEND_FG)
    arr = np.array(img)
    arr.flags.writeable = False  # cached and shared
    return arr


def overlay(image: np.ndarray, pred_rgb: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Prediction colours blended over the image, as (H, W, 3) uint8 RGB.

    Exactly `np.rint((1 - alpha) * image + alpha * pred_rgb)` in float64, cast to uint8;
    `alpha` in [0, 1] is the weight of the prediction (0 = image only, 1 = colours only).
    """
    image = _check_rgb("image", image)
    pred_rgb = _check_rgb("pred_rgb", pred_rgb)
    if image.shape != pred_rgb.shape:
        raise ValueError(f"overlay: image {image.shape} and prediction {pred_rgb.shape} differ")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay: alpha {alpha} is not in [0, 1]")
    out = (1.0 - alpha) * image.astype(np.float64) + alpha * pred_rgb.astype(np.float64)
    return np.rint(out).astype(np.uint8)


def overlay_with_legend(
    image: np.ndarray, pred_rgb: np.ndarray, class_map: ClassMap, alpha: float = 0.5
) -> np.ndarray:
    """`overlay(image, pred_rgb, alpha)` with the comparison panels' colour legend below it.

    An (H + L, W, 3) uint8 array: rows `:H` are exactly the overlay, rows `H:` the legend strip
    (a swatch and name per class; no 'ignore': a prediction never holds it), wrapped to the
    image width with text sized for it, as in `comparison_panel`.
    """
    blended = overlay(image, pred_rgb, alpha)
    w = blended.shape[1]
    legend = _legend_strip(w, class_map, _font_size(w), ignore=False)
    return np.concatenate([blended, legend], axis=0)
