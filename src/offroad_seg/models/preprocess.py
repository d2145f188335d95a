"""The one image -> tensor path, shared by extract, evaluate and predict.

Train/eval skew is the classic bug of two-stage pipelines, so every stage that feeds the
backbone uses `preprocess` = `normalize(resize_image(...))` and every stage that needs labels
at the working size calls `resize_labels`; nothing else resizes or normalises.

The two halves run where they are cheapest: `resize_image` on uint8 in the CPU decoding workers
(antialiased bilinear, within 1 grey level of PIL's BILINEAR resize, which is what the seed's
torchvision transforms computed; 5x faster than resizing floats, and a 4x smaller transfer to
the GPU), `normalize` on the device that runs the backbone.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from offroad_seg.config import DEFAULT_SIZE
from offroad_seg.errors import ConfigError
from offroad_seg.models.variants import DINOV2_PATCH

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_size(text: str) -> tuple[int, int]:
    """'266x476' (rows x cols) -> (266, 476), positive; whether they are multiples of the
    patch size is checked where the backbone is known (`Preprocessing`, `check_size`)."""
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError as e:
        raise ConfigError(f"size {text!r}: expected ROWSxCOLS, e.g. 266x476") from e
    if rows <= 0 or cols <= 0:
        raise ConfigError(f"size {rows}x{cols}: both sides must be positive")
    return rows, cols


def check_size(size: Sequence[int], patch: int) -> None:
    """Both sides positive multiples of the backbone's patch (14 DINOv2, 16 DINOv3)."""
    rows, cols = size
    if rows <= 0 or cols <= 0 or rows % patch or cols % patch:
        raise ConfigError(
            f"size {rows}x{cols}: both sides must be positive multiples of {patch}, the "
            f"backbone's patch size (e.g. {max(1, round(rows / patch)) * patch}x"
            f"{max(1, round(cols / patch)) * patch})"
        )


@dataclass(frozen=True)
class Preprocessing:
    """How images become backbone input: resize to `size` (rows, cols), then normalise; the
    backbone cuts them into `patch_size` squares (the token grid)."""

    size: tuple[int, int] = DEFAULT_SIZE
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "bilinear-antialias-uint8"
    label_resize: str = "nearest"
    patch_size: int = DINOV2_PATCH

    def __post_init__(self) -> None:
        check_size(self.size, self.patch_size)
        if self.resize != "bilinear-antialias-uint8" or self.label_resize != "nearest":
            raise ConfigError(f"unsupported resize {self.resize!r}/{self.label_resize!r}")

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (rows, cols) of the backbone at this size."""
        return self.size[0] // self.patch_size, self.size[1] // self.patch_size

    def to_dict(self) -> dict:
        d = asdict(self)  # patch_size included, as always (fingerprints of old caches hold)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            size=tuple(d["size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            resize=d.get("resize", "bilinear-antialias-uint8"),
            label_resize=d.get("label_resize", "nearest"),
            patch_size=int(d.get("patch_size", DINOV2_PATCH)),
        )


def resize_image(images: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 RGB (3, H, W) or (B, 3, H, W) on the CPU -> uint8 (B, 3, rows, cols), resized
    with antialiased bilinear interpolation in uint8 arithmetic."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dtype != torch.uint8:
        raise TypeError(f"resize_image expects uint8 images, got {images.dtype}")
    if tuple(images.shape[-2:]) == tuple(prep.size):
        return images
    return F.interpolate(
        images.cpu(), size=prep.size, mode="bilinear", align_corners=False, antialias=True
    )


def normalize(images: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 (B, 3, rows, cols) on any device -> float32, ImageNet-normalised."""
    mean, std = _mean_std(prep.mean, prep.std, images.device)
    return (images.float() - mean) / std


@functools.lru_cache(maxsize=16)
def _mean_std(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, 1, 1) mean and std in 0..255 units, made once per device: a copy from the host
    per batch would be a host sync per batch on CUDA."""
    return tuple((torch.tensor(v).view(1, 3, 1, 1) * 255.0).to(device) for v in (mean, std))


def preprocess(images: torch.Tensor | Sequence[torch.Tensor], prep: Preprocessing) -> torch.Tensor:
    """uint8 RGB images (B, 3, H, W), or a list of (3, H, W) of any sizes -> normalised float32
    (B, 3, rows, cols): `normalize(resize_image(...))`, the path every stage takes."""
    if not isinstance(images, torch.Tensor):
        return torch.cat([preprocess(img, prep) for img in images])
    return normalize(resize_image(images, prep), prep)


def nearest_indices(src: int, dst: int) -> np.ndarray:
    """Source index of each destination pixel for nearest resizing, sampled at pixel centres
    (the same rule as PIL's NEAREST and torch's 'nearest-exact')."""
    # floor((i + 0.5) * src / dst) in exact integer arithmetic
    return (2 * np.arange(dst, dtype=np.int64) + 1) * src // (2 * dst)


def resize_labels(ids: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """(H, W) class ids -> (rows, cols) by nearest neighbour (never blends class ids)."""
    rows, cols = size
    if ids.shape == (rows, cols):
        return ids
    return ids[np.ix_(nearest_indices(ids.shape[0], rows), nearest_indices(ids.shape[1], cols))]


def image_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) uint8 tensor (no copy of the pixel data beyond layout)."""
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
