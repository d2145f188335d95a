"""What a training reads: its caches, opened and checked together (same features, a held-out
validation set), and their features loaded into memory or prepared for streaming, once for
any number of trainings on them.

Caches may differ in working size (scale augmentation: the same images extracted at several
sizes); everything else that decides what their features mean must agree. The head's working
size, the one inference resizes to, is the validation cache's (the size its best epoch was
chosen at), or the first training cache's without one."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from offroad_seg.config import TrainConfig
from offroad_seg.core.distributed import SINGLE, World
from offroad_seg.errors import CacheError, ConfigError
from offroad_seg.features.cache import FeatureCache
from offroad_seg.features.cache_format import CacheSpec
from offroad_seg.models.fingerprint import compat_differences
from offroad_seg.training.holdout import check_holdout
from offroad_seg.training.sources import (
    FeatureTensors,
    InMemorySource,
    StreamingSource,
    choose_source,
    view0_features,
)

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """Caches opened and features loaded once, for any number of trainings on them (a sweep
    trains every trial of a process on one)."""

    caches: list[FeatureCache]
    val: FeatureCache | None
    source: InMemorySource | StreamingSource
    val_features: tuple[FeatureTensors, torch.Tensor] | None
    device: torch.device
    val_hackathon: torch.Tensor | None = None  # the val cache's hackathon-protocol labels

    @property
    def working_spec(self) -> CacheSpec:
        """The cache whose preprocessing (working size) the trained head is saved with."""
        return (self.val or self.caches[0]).spec

    @property
    def train_sizes(self) -> list[tuple[int, int]]:
        """The training caches' working sizes, each once, in the order given."""
        return list(dict.fromkeys(tuple(c.spec.preprocessing.size) for c in self.caches))

    @property
    def fingerprints(self) -> tuple[list[str], str | None]:
        return [c.spec.fingerprint for c in self.caches], (
            self.val.spec.fingerprint if self.val else None
        )


def load_training_data(cfg: TrainConfig, device: torch.device, world: World = SINGLE):
    """Open and check the caches of `cfg`, and load (or prepare to stream) their features."""
    caches, val = open_train_caches(cfg)
    source = choose_source(
        caches, device, cfg.memory_budget_gb, cfg.stream, cfg.shuffle_window, cfg.progress, world
    )
    val_features = None
    if val is not None:
        val_features = view0_features(val)
        if source.kind == "memory":  # the training set fits, so the smaller val set does too
            val_features = (val_features[0].to(device), val_features[1].to(device))
    hackathon = val.hackathon_labels() if val is not None else None
    if val is not None and hackathon is None:
        log.info("%s has no hackathon-protocol labels (made before 0.2): not reported", val.path)
    val_hackathon = torch.from_numpy(hackathon) if hackathon is not None else None
    return TrainingData(caches, val, source, val_features, device, val_hackathon)


def open_train_caches(cfg: TrainConfig) -> tuple[list[FeatureCache], FeatureCache | None]:
    if not cfg.caches:
        raise ConfigError("no training cache given")
    caches = [FeatureCache.open(p) for p in cfg.caches]
    val = FeatureCache.open(cfg.val_cache) if cfg.val_cache else None
    for cache in caches + ([val] if val else []):
        cache.require_complete()
    first = caches[0]
    for other in caches[1:] + ([val] if val else []):
        diff = compat_differences(_described(other), _described(first), sizes=False)
        if diff:
            raise CacheError(
                f"{other.path}: cannot be used with {first.path}, their features differ: "
                f"{'; '.join(diff[:3])}"
            )
    check_holdout(caches, val)
    return caches, val


def _described(cache: FeatureCache):
    spec = cache.spec
    return spec.backbone, spec.preprocessing, spec.class_map
