import numpy as np
import pytest
import torch

from offroad_seg.errors import ConfigError
from offroad_seg.models.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    image_to_tensor,
    parse_size,
    preprocess,
    resize_image,
    resize_labels,
)


def test_size_must_be_a_multiple_of_the_patch():
    assert parse_size("266x476") == (266, 476)
    assert Preprocessing().grid == (19, 34)
    with pytest.raises(ConfigError, match="multiples of 14"):
        Preprocessing(size=parse_size("270x480"))
    with pytest.raises(ConfigError, match="ROWSxCOLS"):
        parse_size("big")
    with pytest.raises(ConfigError, match="must be positive"):
        parse_size("0x480")
    with pytest.raises(ConfigError):
        Preprocessing(size=(100, 98))
    # DINOv3's 16-pixel patches
    prep = Preprocessing(size=(272, 480), patch_size=16)
    assert prep.grid == (17, 30)
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    with pytest.raises(
        ConfigError, match=r"multiples of 16, the backbone's patch size \(e.g. 272x480\)"
    ):
        Preprocessing(size=(266, 476), patch_size=16)
    # caches and heads written before DINOv3 record patch 14 (or nothing): read as DINOv2's
    old = Preprocessing().to_dict()
    assert old["patch_size"] == 14
    del old["patch_size"]
    assert Preprocessing.from_dict(old) == Preprocessing()


def test_preprocess_matches_pil_resize_then_normalize():
    """The seed resized PIL images (uint8, BILINEAR with antialiasing), then normalised."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    rgb = np.asarray(Image.fromarray(rgb).resize((120, 80)))  # smooth-ish content
    prep = Preprocessing(size=(28, 42))
    out = preprocess(image_to_tensor(rgb), prep)
    assert out.shape == (1, 3, 28, 42) and out.dtype == torch.float32
    pil = np.asarray(Image.fromarray(rgb).resize((42, 28), Image.Resampling.BILINEAR))
    resized = resize_image(image_to_tensor(rgb), prep)[0].permute(1, 2, 0).numpy()
    assert np.abs(resized.astype(int) - pil.astype(int)).max() <= 1
    x = torch.tensor(pil, dtype=torch.float64).permute(2, 0, 1)[None] / 255
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    ref = ((x - mean) / std).numpy()
    one_level = 1 / 255 / min(IMAGENET_STD)
    assert np.abs(out.numpy() - ref).max() <= one_level + 1e-5
    # exactly the normalisation of the uint8 resize
    exact = (torch.from_numpy(resized).permute(2, 0, 1)[None].double() / 255 - mean) / std
    np.testing.assert_allclose(out.numpy(), exact.numpy(), atol=1e-5)


def test_preprocess_list_of_sizes_equals_one_by_one():
    rng = np.random.default_rng(1)
    a = image_to_tensor(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    b = image_to_tensor(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    prep = Preprocessing(size=(28, 42))
    both = preprocess([a, b], prep)
    torch.testing.assert_close(both[0:1], preprocess(a, prep), rtol=0, atol=0)
    torch.testing.assert_close(both[1:2], preprocess(b, prep), rtol=0, atol=0)


@pytest.mark.parametrize(
    "shape,size", [((540, 960), (266, 476)), ((37, 53), (28, 42)), ((10, 10), (28, 14))]
)
def test_label_resize_samples_pixel_centres(shape, size):
    """Each output pixel takes the input pixel under its centre, (i + 1/2) * src / dst, in exact
    fractions (float versions such as torch's nearest-exact round ties like 405.0 down)."""
    from fractions import Fraction

    ids = np.random.default_rng(2).integers(0, 11, shape, dtype=np.uint8)
    rows = [int((i + Fraction(1, 2)) * Fraction(shape[0], size[0])) for i in range(size[0])]
    cols = [int((j + Fraction(1, 2)) * Fraction(shape[1], size[1])) for j in range(size[1])]
    ref = np.array([[ids[r, c] for c in cols] for r in rows], dtype=np.uint8)
    np.testing.assert_array_equal(resize_labels(ids, size), ref)


def test_preprocessing_dict_round_trip():
    prep = Preprocessing(size=(56, 98))
    assert Preprocessing.from_dict(prep.to_dict()) == prep
