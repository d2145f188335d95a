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
    "SegmentationModel": "offroad_seg.model",
    # backbones and classes
    "BACKBONES": "offroad_seg.variants",
    "BackboneVariant": "offroad_seg.variants",
    "load_backbone": "offroad_seg.backbone",
    "ClassMap": "offroad_seg.data",
    # the stages, each one function taking one config
    "ExtractConfig": "offroad_seg.extract",
    "extract": "offroad_seg.extract",
    "TrainConfig": "offroad_seg.train_head",
    "train": "offroad_seg.train_head",
    "EvalConfig": "offroad_seg.evaluate",
    "evaluate": "offroad_seg.evaluate",
    "PredictConfig": "offroad_seg.evaluate",
    "predict": "offroad_seg.evaluate",
    # the cache and checkpoints
    "FeatureCache": "offroad_seg.cache",
    "load_checkpoint": "offroad_seg.checkpoint",
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
    from offroad_seg.backbone import load_backbone
    from offroad_seg.cache import FeatureCache
    from offroad_seg.checkpoint import load_checkpoint
    from offroad_seg.data import ClassMap
    from offroad_seg.evaluate import EvalConfig, PredictConfig, evaluate, predict
    from offroad_seg.extract import ExtractConfig, extract
    from offroad_seg.model import SegmentationModel
    from offroad_seg.train_head import TrainConfig, train
    from offroad_seg.variants import BACKBONES, BackboneVariant
