"""The Python API for notebooks and scripts: a trained head as a callable segmenter.

    from offroad_seg import Segmenter
    seg = Segmenter.from_checkpoint("runs/h1/segmentation_head.pth")
    ids = seg("frame.png")            # (H, W) uint8 class ids at the image's own size
    pred = seg.predict(pil_image, logits=True)
    pred.codes, pred.colors, pred.logits

It runs exactly the CLI's path (the same decoding, `resize_image`, `SegmentationModel.logits`
and full-size upsampling), so its masks equal those `offroad-seg predict` writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from offroad_seg.data.classes import ClassMap
from offroad_seg.data.images import read_image
from offroad_seg.errors import DataError
from offroad_seg.models.preprocess import image_to_tensor, resize_image
from offroad_seg.models.segmentation import TTA, SegmentationModel
from offroad_seg.models.upsampling import predict_and_score, upsample_mean
from offroad_seg.models.weights import RANDOM

ImageLike = str | Path | Image.Image | np.ndarray


@dataclass
class Prediction:
    """One image's segmentation at the image's own size."""

    ids: np.ndarray  # (H, W) uint8 class ids (0..K-1)
    class_map: ClassMap
    logits: np.ndarray | None = None  # (K, H, W) float32, when asked for

    @property
    def codes(self) -> np.ndarray:
        """(H, W) uint16 raw class codes, as the dataset's masks store them."""
        return self.class_map.ids_to_codes(self.ids)

    @property
    def colors(self) -> np.ndarray:
        """(H, W, 3) uint8 class colours."""
        return self.class_map.colorize(self.ids)

    def color_image(self) -> Image.Image:
        """A paletted PIL image in the class colours (what `masks_color/` holds)."""
        return self.class_map.color_image(self.ids)


def to_rgb(image: ImageLike) -> np.ndarray:
    """A file path, PIL image or (H, W, 3) uint8 array -> (H, W, 3) uint8 RGB."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise DataError(f"expected an (H, W, 3) uint8 RGB array, got {array.shape} {array.dtype}")
    return array


class Segmenter:
    """A trained head on its backbone: images in, class maps out."""

    def __init__(
        self, model: SegmentationModel, tta: str = "none", tta_scales: Sequence[float] = (1.0,)
    ) -> None:
        self.model = model
        self.tta = TTA.of(tta, tta_scales)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        weights: str | None = None,
        device: str = "auto",
        tta: str = "none",
        tta_scales: Sequence[float] = (1.0,),
    ) -> Segmenter:
        """Load a head checkpoint (`segmentation_head.pth`, or the run folder holding it) and
        the backbone it was trained on (`weights` as for the CLI's `--weights`; by default the
        head's own). `tta="flip"` and `tta_scales` add test-time augmentation passes, as
        `--tta` and `--tta-scales`."""
        return cls(SegmentationModel.from_checkpoint(path, weights, device), tta, tta_scales)

    def __repr__(self) -> str:
        """What the segmenter is: backbone (and whether it was untrained), head with the
        settings it has, working size, classes, device and test-time augmentation."""
        ckpt = self.model.checkpoint
        head = ckpt.head_config
        shape = [f"{s} {getattr(head, s)}" for s in ("width", "depth") if head.spec.has(s)]
        untrained = " (untrained)" if ckpt.backbone.weights_source == RANDOM else ""
        rows, cols = self.model.preprocessing.size
        parts = [
            f"backbone={ckpt.backbone.name}{untrained}",
            f"head={head.name}" + (f" ({', '.join(shape)})" if shape else ""),
            f"size={rows}x{cols}",
            f"classes={len(self.classes)} ({', '.join(self.classes)})",
            f"device={self.model.device.type}",
        ]
        if self.tta != TTA():
            parts.append(f"tta={self.tta.describe(self.model.preprocessing)}")
        return f"Segmenter({', '.join(parts)})"

    @property
    def class_map(self) -> ClassMap:
        return self.model.class_map

    @property
    def classes(self) -> list[str]:
        return self.class_map.names

    def __call__(self, image: ImageLike) -> np.ndarray:
        """(H, W) uint8 class ids of one image, at its own size."""
        return self.predict(image).ids

    def predict(self, image: ImageLike, logits: bool = False) -> Prediction:
        """One image's prediction; `logits=True` adds the (K, H, W) float32 logits."""
        return self.predict_many([image], logits=logits)[0]

    @torch.no_grad()
    def predict_many(
        self, images: Sequence[ImageLike], logits: bool = False, batch_size: int = 8
    ) -> list[Prediction]:
        """Predictions of several images (same-size images share backbone passes)."""
        rgbs = [to_rgb(image) for image in images]
        prep = self.model.preprocessing
        extra = self.tta.extra_sizes(prep)
        out: list[Prediction] = []
        for start in range(0, len(rgbs), batch_size):
            chunk = [image_to_tensor(rgb) for rgb in rgbs[start : start + batch_size]]
            resized = torch.cat([resize_image(image, prep) for image in chunk])
            scaled = [
                torch.cat([resize_image(image, replace(prep, size=size)) for image in chunk])
                for size in extra
            ]
            parts = self.model.tta_logits(resized, scaled, self.tta)
            for j, rgb in enumerate(rgbs[start : start + batch_size]):
                size = rgb.shape[:2]
                mine = [part[j : j + 1] for part in parts]
                pred = predict_and_score(mine, None, size)[0][0]
                full = upsample_mean(mine, size)[0] if logits else None
                out.append(
                    Prediction(
                        pred.to(torch.uint8).cpu().numpy(),
                        self.class_map,
                        None if full is None else full.cpu().numpy(),
                    )
                )
        return out
