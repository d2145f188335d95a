"""The classes a scene paints (internal indices, raw codes), their colours and textures."""

from __future__ import annotations

import numpy as np

from offroad_seg.data.classes import ClassMap

# Internal class indices (the order of ClassMap.default()); codes come from the class map.
_BG, _TREE, _LUSH, _GRASS, _DRYBUSH, _CLUTTER, _FLOWER, _LOG, _ROCK, _LAND, _SKY = range(11)
_NAMES = (
    "Background",
    "Trees",
    "Lush Bushes",
    "Dry Grass",
    "Dry Bushes",
    "Ground Clutter",
    "Flowers",
    "Logs",
    "Rocks",
    "Landscape",
    "Sky",
)
_CODE_BY_NAME = {c.name: c.code for c in ClassMap.default().classes}
_CODES = np.array([_CODE_BY_NAME[n] for n in _NAMES], dtype=np.uint16)

# Per-class texture weights for the (mid, small, fine, streak) noise fields, as a relative
# brightness modulation applied to everything painted with that class.
_TEXTURE = np.array(
    [
        [0.02, 0.03, 0.02, 0.00],  # Background
        [0.10, 0.22, 0.10, 0.06],  # Trees
        [0.08, 0.20, 0.09, 0.00],  # Lush Bushes
        [0.06, 0.08, 0.09, 0.26],  # Dry Grass
        [0.06, 0.18, 0.16, 0.08],  # Dry Bushes
        [0.04, 0.10, 0.12, 0.00],  # Ground Clutter
        [0.02, 0.05, 0.07, 0.00],  # Flowers
        [0.04, 0.08, 0.07, 0.00],  # Logs
        [0.07, 0.12, 0.09, 0.00],  # Rocks
        [0.09, 0.07, 0.10, 0.02],  # Landscape
        [0.00, 0.00, 0.012, 0.00],  # Sky
    ],
    dtype=np.float32,
)

# Scene palettes (RGB, before lighting); one entry per class group is drawn per scene and
# jittered, so the ranges of ground, grass, dry bushes, logs and rocks overlap across scenes.
_LAND_COLORS = np.array(
    [[192, 160, 122], [176, 136, 100], [165, 148, 124], [198, 172, 138], [158, 124, 94]],
    np.float32,
)
_GRASS_COLORS = np.array(
    [[204, 178, 122], [186, 160, 106], [176, 150, 104], [196, 170, 130], [168, 146, 96]],
    np.float32,
)
_CANOPY_COLORS = np.array([[84, 100, 58], [58, 82, 46], [100, 108, 78], [72, 92, 52]], np.float32)
_TRUNK_COLORS = np.array([[98, 80, 62], [110, 92, 74], [84, 68, 54]], np.float32)
_LUSH_COLORS = np.array([[78, 118, 50], [92, 126, 62], [66, 104, 56], [104, 130, 64]], np.float32)
_DRYBUSH_COLORS = np.array(
    [[126, 100, 70], [140, 120, 92], [112, 92, 70], [132, 108, 80]], np.float32
)
_LOG_COLORS = np.array([[120, 90, 62], [140, 124, 104], [106, 78, 54], [128, 104, 80]], np.float32)
_ROCK_COLORS = np.array(
    [[132, 122, 110], [116, 108, 100], [146, 130, 110], [104, 96, 88], [150, 140, 128]],
    np.float32,
)
_CLUTTER_COLORS = np.array(
    [[82, 64, 46], [122, 116, 108], [150, 126, 96], [64, 58, 52], [110, 86, 60]], np.float32
)
_FLOWER_COLORS = np.array(
    [[236, 202, 42], [238, 236, 222], [162, 92, 204], [242, 142, 42], [232, 110, 160]],
    np.float32,
)
_FLOWER_LEAF = np.array([96, 120, 70], np.float32)


def min_class_pixels(width: int, height: int) -> int:
    """The fewest pixels every class gets in a scene of this size (400 at 960x540)."""
    return max(6, round(400 * width * height / (960 * 540)))
