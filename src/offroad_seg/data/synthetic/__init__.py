"""Procedural off-road desert driving frames in the real dataset's format.

Each scene is a camera view over desert ground: a sky gradient with clouds above a sloped, wavy
horizon, hazy hills, sandy ground (Landscape) with dry-grass patches and sometimes a dirt track,
and objects standing on the ground in perspective (smaller near the horizon): trees, lush and dry
bushes, rocks, logs, ground clutter and flower clusters, with shadows. The bottom of the frame
holds a vehicle hood or a dark unlabelled band (Background). Colours of several classes overlap
on purpose (dry grass vs ground, dry bushes vs logs, tree canopies vs lush bushes, ...) and every
class carries its own texture, so a model needs texture and shape, not colour alone.

Every class of `ClassMap.default()` appears in every scene (at least `min_class_pixels` pixels),
and the mask is exact: a pixel painted with a class's colour carries that class's raw code.
Everything is deterministic by seed (`np.random.default_rng`, no global state).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from offroad_seg.config import MIN_HEIGHT, MIN_WIDTH, SynthConfig, check_synth_size
from offroad_seg.core.text import plural
from offroad_seg.data.dataset import IMAGES_DIR, MASKS_DIR
from offroad_seg.data.images import write_mask
from offroad_seg.data.synthetic.palette import min_class_pixels
from offroad_seg.data.synthetic.render import render_scene
from offroad_seg.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = [
    "MIN_HEIGHT",
    "MIN_WIDTH",
    "SynthConfig",
    "min_class_pixels",
    "render_scene",
    "split_names",
    "synthesize",
    "write_split",
]

# Real file names look like cc0000012.png, mt0000000.png, ww10000000.png.
_PREFIXES = (("cc", 7, 0), ("mt", 7, 0), ("ww", 8, 10_000_000))
_NAME_STREAM = 0x6E616D65  # separates the name generator's stream from the scenes'


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# Public API


def split_names(count: int, seed: int) -> list[str]:
    """The sorted file names `write_split(folder, count, seed)` writes: cc/mt/ww prefixes in
    turn with increasing, gapped frame numbers (cc0000012.png, mt0000031.png, ww10000007.png)."""
    if count < 0 or seed < 0:
        raise ConfigError(f"synthetic data: count {count} and seed {seed} must be >= 0")
    rng = np.random.default_rng([seed, _NAME_STREAM])
    names = []
    for i, (prefix, digits, offset) in enumerate(_PREFIXES):
        n = count // len(_PREFIXES) + (1 if i < count % len(_PREFIXES) else 0)
        start = int(rng.integers(0, 900_000))
        numbers = start + np.cumsum(rng.integers(1, 9, n))
        names.extend(f"{prefix}{offset + int(v):0{digits}d}.png" for v in numbers)
    return sorted(names)


def _scene_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def write_split(
    folder: Path, count: int, seed: int, width: int = 960, height: int = 540
) -> list[str]:
    """Writes folder/Color_Images/NAME.png (8-bit RGB) and folder/Segmentation/NAME.png (16-bit
    raw codes, via data.write_mask); returns the names in sorted order.

    Scene i (in name order) is `render_scene` of a seed derived from (seed, i). Files of the same
    names are overwritten; other PNGs already in those folders are an error (no mixed datasets).
    """
    check_synth_size(width, height)
    folder = Path(folder)
    names = split_names(count, seed)
    image_dir, mask_dir = folder / IMAGES_DIR, folder / MASKS_DIR
    for d in (image_dir, mask_dir):
        if d.is_dir():
            stale = sorted(p.name for p in d.glob("*.png") if p.name not in set(names))
            if stale:
                raise DataError(
                    f"{d}: holds {plural(len(stale), 'other PNG file')} ({stale[0]}"
                    f"{', ...' if len(stale) > 1 else ''}); "
                    "write synthetic data into an empty folder"
                )
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        image, codes = render_scene(_scene_seed(seed, i), width, height)
        Image.fromarray(image).save(image_dir / name, compress_level=3)
        write_mask(mask_dir / name, codes)
    # debug: `synth` and the demo say what was written in their one summary line
    log.debug(
        "wrote %s (%dx%d) to %s", plural(len(names), "synthetic scene"), width, height, folder
    )
    return names


def synthesize(config: SynthConfig) -> dict[str, list[str]]:
    """Writes both splits (train and val must use different seeds so their scenes differ);
    returns {"train": names, "val": names}.

    The split seeds are derived from `config.seed`; the val seed is chosen so that no val file
    name equals a train file name.
    """
    train_seed = _scene_seed(config.seed, 0)
    train_names = split_names(config.train, train_seed)
    val_seed = _scene_seed(config.seed, 1)
    while val_seed == train_seed or set(split_names(config.val, val_seed)) & set(train_names):
        val_seed = _scene_seed(val_seed, 1)
    out = config.out
    return {
        "train": write_split(out / "train", config.train, train_seed, config.width, config.height),
        "val": write_split(out / "val", config.val, val_seed, config.width, config.height),
    }
