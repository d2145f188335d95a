"""Fixtures of the inference tests."""

import pytest
import torch

from offroad_seg.data.dataset import list_samples
from offroad_seg.data.images import read_image
from offroad_seg.models.preprocess import Preprocessing, image_to_tensor, resize_image
from tests.conftest import SIZE


@pytest.fixture(scope="session")
def images(dataset) -> torch.Tensor:
    """The val scenes resized to the working size, as the decode workers make them."""
    prep = Preprocessing(size=SIZE)
    samples = list_samples(dataset / "val")
    return torch.cat([resize_image(image_to_tensor(read_image(s.image)), prep) for s in samples])
