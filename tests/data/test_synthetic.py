"""The procedural desert scenes: format, determinism, class coverage and difficulty."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from offroad_seg.data.classes import ClassMap
from offroad_seg.data.dataset import IMAGES_DIR, MASKS_DIR, list_samples
from offroad_seg.data.images import read_labels
from offroad_seg.data.synthetic import SynthConfig, split_names, synthesize, write_split
from offroad_seg.data.synthetic.palette import min_class_pixels
from offroad_seg.data.synthetic.render import render_scene
from offroad_seg.errors import ConfigError, DataError

SMALL = (196, 112)
NAME_RE = re.compile(r"^(cc\d{7}|mt\d{7}|ww\d{8})\.png$")
CODES = {int(c) for c in ClassMap.default().codes}


def _ids(codes: np.ndarray) -> np.ndarray:
    return ClassMap.default().codes_to_ids(codes)


def test_render_types_and_shapes() -> None:
    image, mask = render_scene(0, *SMALL)
    assert image.shape == (112, 196, 3) and image.dtype == np.uint8
    assert mask.shape == (112, 196) and mask.dtype == np.uint16


def test_same_seed_same_scene_other_seed_other_scene() -> None:
    a_img, a_mask = render_scene(7, *SMALL)
    b_img, b_mask = render_scene(7, *SMALL)
    assert np.array_equal(a_img, b_img)
    assert np.array_equal(a_mask, b_mask)
    c_img, c_mask = render_scene(8, *SMALL)
    assert (a_img != c_img).any(axis=-1).mean() > 0.5
    assert (a_mask != c_mask).mean() > 0.1


@pytest.mark.parametrize(
    ("size", "seeds"), [(SMALL, range(6)), ((952, 532), range(2)), ((960, 540), [5])]
)
def test_every_class_in_every_scene(size: tuple[int, int], seeds: range) -> None:
    need = min_class_pixels(*size)
    for seed in seeds:
        _, mask = render_scene(seed, *size)
        codes, counts = np.unique(mask, return_counts=True)
        assert set(codes.tolist()) == CODES, f"seed {seed}"
        found = dict(zip(codes.tolist(), counts.tolist(), strict=True))
        assert counts.min() >= need, f"seed {seed}: {found}"


def test_min_class_pixels_scales_with_area() -> None:
    assert min_class_pixels(960, 540) == 400
    assert 6 <= min_class_pixels(*SMALL) < 400


def test_layout_sky_on_top_background_at_bottom() -> None:
    sky, land, bg = 10000, 7100, 0
    for seed in range(4):
        _, mask = render_scene(seed, *SMALL)
        rows = np.arange(mask.shape[0])[:, None]
        assert (mask[0] == sky).mean() > 0.5
        assert (mask[-1] == bg).all()  # hood or dark band in every frame
        assert rows.repeat(mask.shape[1], 1)[mask == sky].mean() < (
            rows.repeat(mask.shape[1], 1)[mask == land].mean()
        )


def test_class_colours_match_their_codes() -> None:
    """Pixels carry the colour of the class their code names (on average, per scene)."""
    for seed in range(4):
        image, mask = render_scene(seed, *SMALL)
        rgb = image.astype(np.float64)

        def mean(code: int, rgb: np.ndarray = rgb, mask: np.ndarray = mask) -> np.ndarray:
            return rgb[mask == code].mean(axis=0)

        r, g, b = mean(10000)  # sky: blue
        assert b > r
        r, g, b = mean(200)  # lush bushes: green
        assert g > r and g > b
        r, g, b = mean(300)  # dry grass: straw
        assert r > b
        assert mean(0).mean() < 80  # background: dark hood / band
        assert mean(0).mean() < mean(7100).mean()


def _nearest_mean_accuracy(image: np.ndarray, ids: np.ndarray) -> float:
    x = image.reshape(-1, 3).astype(np.float64)
    y = ids.ravel()
    classes = np.unique(y)
    means = np.stack([x[y == k].mean(axis=0) for k in classes])
    d = ((x[:, None, :] - means[None]) ** 2).sum(-1)
    return float((classes[d.argmin(1)] == y).mean())


def test_colour_alone_does_not_solve_it() -> None:
    """A nearest-mean-colour classifier fitted on the scene itself stays far from perfect."""
    accs = []
    for seed in range(6):
        image, mask = render_scene(seed, *SMALL)
        accs.append(_nearest_mean_accuracy(image, _ids(mask)))
    image, mask = render_scene(0, 480, 270)
    accs.append(_nearest_mean_accuracy(image, _ids(mask)))
    assert max(accs) < 0.9, accs
    assert np.mean(accs) < 0.8, accs


def test_split_names_look_real_and_cycle_prefixes() -> None:
    names = split_names(7, 3)
    assert names == sorted(names) and len(set(names)) == 7
    assert all(NAME_RE.match(n) for n in names), names
    prefixes = [n[:2] for n in names]
    assert prefixes.count("cc") == 3 and prefixes.count("mt") == 2 and prefixes.count("ww") == 2
    assert all(n.startswith("ww1") for n in names if n.startswith("ww"))
    assert split_names(7, 3) == names
    assert split_names(7, 4) != names
    assert split_names(0, 3) == []


def test_write_split_files(tmp_path: Path) -> None:
    names = write_split(tmp_path / "s", 4, seed=11, width=196, height=112)
    assert names == split_names(4, 11)
    image_files = sorted(p.name for p in (tmp_path / "s" / IMAGES_DIR).iterdir())
    mask_files = sorted(p.name for p in (tmp_path / "s" / MASKS_DIR).iterdir())
    assert image_files == mask_files == names
    for name in names:
        with Image.open(tmp_path / "s" / IMAGES_DIR / name) as img:
            assert img.mode == "RGB" and img.size == (196, 112)
        with Image.open(tmp_path / "s" / MASKS_DIR / name) as msk:
            assert msk.mode == "I;16" and msk.size == (196, 112)
            codes = np.asarray(msk)
        assert set(np.unique(codes).tolist()) == CODES
    samples = list_samples(tmp_path / "s")
    assert [s.name for s in samples] == names
    ids = read_labels(samples[0].mask, ClassMap.default())
    assert ids.shape == (112, 196) and int(ids.max()) == 10


def test_write_split_is_reproducible_and_refuses_foreign_files(tmp_path: Path) -> None:
    a = write_split(tmp_path / "a", 3, seed=2, width=96, height=64)
    b = write_split(tmp_path / "b", 3, seed=2, width=96, height=64)
    assert a == b
    for name in a:
        for sub in (IMAGES_DIR, MASKS_DIR):
            assert (tmp_path / "a" / sub / name).read_bytes() == (
                tmp_path / "b" / sub / name
            ).read_bytes()
    # Writing the same split again overwrites; other PNGs in the folder are an error.
    assert write_split(tmp_path / "a", 3, seed=2, width=96, height=64) == a
    with pytest.raises(DataError, match="other PNG"):
        write_split(tmp_path / "a", 3, seed=3, width=96, height=64)


def test_synthesize_train_and_val_differ(tmp_path: Path) -> None:
    config = SynthConfig(tmp_path / "data", train=4, val=3, seed=1, width=196, height=112)
    out = synthesize(config)
    assert set(out) == {"train", "val"}
    assert len(out["train"]) == 4 and len(out["val"]) == 3
    assert not set(out["train"]) & set(out["val"])
    for split, names in out.items():
        assert [s.name for s in list_samples(tmp_path / "data" / split)] == names
    train_imgs = [
        np.asarray(Image.open(tmp_path / "data" / "train" / IMAGES_DIR / n)) for n in out["train"]
    ]
    val_imgs = [
        np.asarray(Image.open(tmp_path / "data" / "val" / IMAGES_DIR / n)) for n in out["val"]
    ]
    for v in val_imgs:
        for t in train_imgs:
            assert (v != t).any(axis=-1).mean() > 0.5
    # Every split has every class.
    for split, names in out.items():
        seen: set[int] = set()
        for n in names:
            seen |= set(
                np.unique(
                    np.asarray(Image.open(tmp_path / "data" / split / MASKS_DIR / n))
                ).tolist()
            )
        assert seen == CODES
    # Same config, same dataset.
    again = synthesize(
        SynthConfig(tmp_path / "again", train=4, val=3, seed=1, width=196, height=112)
    )
    assert again == out


def test_invalid_settings() -> None:
    with pytest.raises(ConfigError):
        SynthConfig(Path("x"), train=0)
    with pytest.raises(ConfigError):
        SynthConfig(Path("x"), width=32)
    with pytest.raises(ConfigError):
        render_scene(0, 40, 30)
    with pytest.raises(ConfigError):
        split_names(-1, 0)
    with pytest.raises(ConfigError):
        SynthConfig(Path("x"), seed=-1)
    assert SynthConfig("x").out == Path("x")  # type: ignore[arg-type]
