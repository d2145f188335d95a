"""offroad-seg: off-road scene segmentation on a frozen DINOv2 backbone with a feature cache.

The public surface is what this module exports; everything else is private by convention.
Names load on first use, so `import offroad_seg` stays cheap (the CLI imports it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    # a trained head as a callable (notebooks, scripts)
    "Segmenter": "offroad_seg.api",
    "Prediction": "offroad_seg.api",
    "SegmentationModel": "offroad_seg.models.segmentation",
    # backbones and classes
    "BACKBONES": "offroad_seg.models.variants",
    "BackboneVariant": "offroad_seg.models.variants",
    "load_backbone": "offroad_seg.models.backbone",
    "ClassMap": "offroad_seg.data.classes",
    # the stages, each one function taking one config
    "ExtractConfig": "offroad_seg.features.extract",
    "extract": "offroad_seg.features.extract",
    "TrainConfig": "offroad_seg.training.loop",
    "train": "offroad_seg.training.loop",
    "EvalConfig": "offroad_seg.inference.evaluate",
    "evaluate": "offroad_seg.inference.evaluate",
    "PredictConfig": "offroad_seg.inference.predict",
    "predict": "offroad_seg.inference.predict",
    # the cache and checkpoints
    "FeatureCache": "offroad_seg.features.cache",
    "load_checkpoint": "offroad_seg.models.checkpoint",
}
__all__ = [  # noqa: RUF022 (grouped as above)
    "__version__",
    "Segmenter",
    "Prediction",
    "SegmentationModel",
    "BACKBONES",
    "BackboneVariant",
    "load_backbone",
    "ClassMap",
    "ExtractConfig",
    "extract",
    "TrainConfig",
    "train",
    "EvalConfig",
    "evaluate",
    "PredictConfig",
    "predict",
    "FeatureCache",
    "load_checkpoint",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'offroad_seg' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from offroad_seg.api import Prediction, Segmenter
    from offroad_seg.data.classes import ClassMap
    from offroad_seg.features.cache import FeatureCache
    from offroad_seg.features.extract import ExtractConfig, extract
    from offroad_seg.inference.evaluate import EvalConfig, evaluate
    from offroad_seg.inference.predict import PredictConfig, predict
    from offroad_seg.models.backbone import load_backbone
    from offroad_seg.models.checkpoint import load_checkpoint
    from offroad_seg.models.segmentation import SegmentationModel
    from offroad_seg.models.variants import BACKBONES, BackboneVariant
    from offroad_seg.training.loop import TrainConfig, train
