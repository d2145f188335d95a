"""A whole scene: its layers painted back to front, then every class made sure of its pixels."""

from __future__ import annotations

import numpy as np

from offroad_seg.config import check_synth_size
from offroad_seg.data.synthetic.canvas import _Scene, _value_noise
from offroad_seg.data.synthetic.objects import _clutter, _flowers, _ground_points, _paint_object
from offroad_seg.data.synthetic.palette import (
    _BG,
    _CLUTTER,
    _CODES,
    _DRYBUSH,
    _FLOWER,
    _GRASS,
    _GRASS_COLORS,
    _LAND,
    _LAND_COLORS,
    _LOG,
    _LUSH,
    _NAMES,
    _ROCK,
    _SKY,
    _TEXTURE,
    _TREE,
    min_class_pixels,
)
from offroad_seg.data.synthetic.terrain import _bottom, _ground, _hills, _sines, _sky
from offroad_seg.errors import ConfigError


def render_scene(seed: int, width: int = 960, height: int = 540) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 RGB image and (H, W) uint16 mask of raw class codes; deterministic by seed.

    Every class of `ClassMap.default()` covers at least `min_class_pixels(width, height)` pixels.
    The steps draw from one random stream in a fixed order, so a seed always gives one scene.
    """
    check_synth_size(width, height)
    if seed < 0:
        raise ConfigError(f"synthetic data: seed {seed} is negative")
    rng = np.random.default_rng(seed)
    sc, land, grass, coarse = _new_scene(rng, height, width)
    _sky(sc)
    _hills(sc, land)
    _ground(sc, land, grass, coarse)
    _paint_objects(sc, rng)
    _bottom(sc)
    _ensure_classes(sc)
    return _camera(sc, rng), _CODES[sc.cls]


def _new_scene(rng: np.random.Generator, h: int, w: int):
    """The blank canvas: noise fields, horizon, ground colours, sun, shadows and haze."""
    # Noise fields shared by the layers (cell sizes scale with the image).
    px = h / 540  # one 540p pixel in this image's pixels
    mid = _value_noise(rng, h, w, 22, round(w / (24 * px)))
    cell = max(1.5, 4 * px)
    small = _value_noise(rng, h, w, round(h / cell), round(w / cell))
    fine = rng.standard_normal((h, w), dtype=np.float32)
    streak = _value_noise(rng, h, w, round(h / max(3, 10 * px)), round(w / max(1, 2 * px)))
    coarse = _value_noise(rng, h, w, 5, 9)

    xn = np.arange(w, dtype=np.float32) / w
    hor = (
        h * rng.uniform(0.3, 0.47)
        + h * rng.uniform(-0.06, 0.06) * (xn - 0.5)
        + h * 0.012 * _sines(rng, xn, 3, 1.0, 4.0)
    ).astype(np.float32)

    land = _LAND_COLORS[rng.integers(len(_LAND_COLORS))] * (
        1 + rng.uniform(-0.06, 0.06, 3).astype(np.float32)
    )
    grass = _GRASS_COLORS[rng.integers(len(_GRASS_COLORS))] * (
        1 + rng.uniform(-0.06, 0.06, 3).astype(np.float32)
    )
    sun = float(rng.uniform(-1, 1))
    sc = _Scene(
        rng=rng,
        h=h,
        w=w,
        cls=np.empty((h, w), np.uint8),
        rgb=np.empty((3, h, w), np.float32),
        hor=hor,
        ground_bottom=h * 0.88,
        mid=mid,
        small=small,
        fine=fine,
        streak=streak,
        sun=sun,
        shadow_dx=-np.sign(sun) * rng.uniform(0.3, 1.0),
        shadow_k=float(rng.uniform(0.55, 0.75)),
        haze_rgb=np.array(
            [rng.uniform(175, 205), rng.uniform(180, 205), rng.uniform(190, 215)], np.float32
        ),
        haze_max=float(rng.uniform(0.35, 0.65)),
        haze_len=float((h - hor.mean()) * rng.uniform(0.08, 0.16)),
    )
    return sc, land, grass, coarse


def _paint_objects(sc: _Scene, rng: np.random.Generator) -> None:
    """Clutter and flowers are low and small: painted first; objects then far to near."""
    _clutter(sc, _ground_points(sc, int(rng.integers(80, 220)), 0.02, 1.0, 1.3))
    for bx, by in _ground_points(sc, int(rng.integers(3, 7)), 0.05, 0.95, 1.0):
        _flowers(sc, float(bx), float(by))
    objects: list[tuple[float, float, int]] = []
    for kind, lo, hi, t_lo, t_hi, power in (
        (_TREE, 2, 5, 0.04, 0.35, 1.3),
        (_LUSH, 3, 9, 0.02, 0.8, 1.5),
        (_DRYBUSH, 5, 13, 0.02, 0.9, 1.4),
        (_ROCK, 5, 14, 0.02, 1.0, 1.4),
        (_LOG, 2, 5, 0.05, 0.95, 1.2),
    ):
        n = int(rng.integers(lo, hi))
        pts = _ground_points(sc, n, t_lo, t_hi, power)
        objects.extend((float(y), float(x), kind) for x, y in pts)
    objects.sort(key=lambda o: o[0])
    for y, x, kind in objects:
        _paint_object(sc, kind, x, y)


def _camera(sc: _Scene, rng: np.random.Generator) -> np.ndarray:
    """The painted scene as a camera would record it: per-class texture, black level, white
    balance, exposure and gamma; (H, W, 3) uint8."""
    k = sc.cls
    tex = (
        1.0
        + _TEXTURE[k, 0] * sc.mid
        + _TEXTURE[k, 1] * sc.small
        + _TEXTURE[k, 2] * sc.fine
        + _TEXTURE[k, 3] * sc.streak
    )
    rgb = sc.rgb
    rgb *= tex[None]
    rgb += rng.normal(0.0, 1.5, 3).astype(np.float32)[:, None, None]  # black level
    img8 = np.clip(rgb, 0, 255).astype(np.uint8)
    gains = (1.0 + rng.normal(0.0, 0.035, 3)) * rng.uniform(0.82, 1.1)
    gamma = rng.uniform(0.85, 1.15)
    levels = np.arange(256, dtype=np.float64) / 255.0
    luts = np.clip(255.0 * (levels[None, :] ** gamma) * gains[:, None], 0, 255).astype(np.uint8)
    image = np.empty((sc.h, sc.w, 3), np.uint8)
    for c in range(3):
        image[..., c] = luts[c][img8[c]]
    return image


def _ensure_classes(sc: _Scene) -> None:
    """Add foreground instances of any object class that ended up with too few pixels."""
    need = min_class_pixels(sc.w, sc.h)
    hor = float(sc.hor.mean())
    y_lo = int(hor + 0.45 * (sc.ground_bottom - hor))
    y_hi = int(sc.ground_bottom)
    for attempt in range(4):
        counts = np.bincount(sc.cls.ravel(), minlength=len(_CODES))
        missing = [k for k in range(len(_CODES)) if counts[k] < need]
        if not missing:
            return
        for k in missing:
            if k in (_BG, _SKY, _LAND):
                raise RuntimeError(f"synthetic scene: class {_NAMES[k]} has {counts[k]} pixels")
            # Stand the new object on a visible ground pixel in the lower part of the frame.
            band = sc.cls[y_lo:y_hi]
            ys, xs = np.nonzero((band == _LAND) | (band == _GRASS))
            if ys.size:
                i = int(sc.rng.integers(ys.size))
                x, y = float(xs[i]), float(ys[i] + y_lo)
            else:
                x = float(sc.rng.uniform(0.1, 0.9) * sc.w)
                y = float(sc.rng.uniform(y_lo, y_hi))
            # Size so the object stays within about a seventh of the width.
            g = max(sc.g_at(x, y), 1.0)
            width_scale = {_TREE: 1.0, _LOG: 1.4, _FLOWER: 0.6, _CLUTTER: 0.6}.get(k, 0.9)
            mult = min(1.0, (sc.w / 7) / (width_scale * g)) * (1.0 + 0.3 * attempt)
            _paint_object(sc, k, x, y, mult)
    counts = np.bincount(sc.cls.ravel(), minlength=len(_CODES))
    short = [f"{_NAMES[k]}={counts[k]}" for k in range(len(_CODES)) if counts[k] < need]
    if short:
        raise RuntimeError(f"synthetic scene: too few pixels for {', '.join(short)}")
