"""What a training on a block cache trains: the head on the backbone's blocks from the cached
one on (`models.tuning.TunedModel`), with the backbone's weights loaded again and checked
against the cache's. A cache of final features trains the head alone. And what scores an
ensemble of such heads on a cache (`cached_ensemble`, for `sweep --ensemble-top`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from offroad_seg.config import FULL_TUNING_LR_FACTOR, TrainConfig
from offroad_seg.errors import ConfigError
from offroad_seg.features.cache import FeatureCache
from offroad_seg.models.checkpoint import HeadCheckpoint
from offroad_seg.models.heads.ensemble import EnsembleHead
from offroad_seg.models.segmentation import matching_backbone
from offroad_seg.models.tuning import TailsModel, TunedModel, TuneSpec, member_tails, tail_layout


def tune_spec(cfg: TrainConfig, cache: FeatureCache) -> TuneSpec | None:
    """The tuning a run on `cache` does: None for a cache of final features (where `--tune`
    is refused: the blocks' input is not in it)."""
    bb = cache.spec.backbone
    if bb.block is None:
        if cfg.tune is not None:
            raise ConfigError(
                f"{cache.path}: --tune {cfg.tune} needs a block cache, and this one holds final "
                f"features; re-extract it with --block K (e.g. --block {bb.variant.depth - 4} "
                "tunes the last 4 blocks)"
            )
        return None
    lora = cfg.tune == "lora"
    return TuneSpec(
        cfg.tune or "frozen",
        bb.block,
        cfg.lora_rank if lora else 0,
        cfg.lora_alpha if lora else 0.0,
    )


def backbone_lr_scale(cfg: TrainConfig) -> float:
    """The tuned blocks' learning rate as a fraction of `--lr`."""
    if cfg.backbone_lr is not None:
        return cfg.backbone_lr / cfg.lr
    return FULL_TUNING_LR_FACTOR if cfg.tune == "full" else 1.0


def trained_model(
    cfg: TrainConfig, cache: FeatureCache, head: nn.Module, tuning: TuneSpec | None, device
) -> nn.Module:
    """The module a run trains: the head, or the head on blocks K..N-1 of the backbone the
    block cache was extracted with (`--weights` as in extract; other weights refused)."""
    if tuning is None:
        return head
    spec = cache.spec.backbone
    backbone = matching_backbone(spec, cfg.weights, device, cache.path, "the cache", "extracted")
    grid = cache.spec.preprocessing.grid
    return TunedModel(backbone, head, tuning, grid, cfg.checkpointing).to(device)


def cached_ensemble(
    members: Sequence[HeadCheckpoint],
    cache: FeatureCache,
    weights: str | None,
    device: torch.device,
) -> nn.Module:
    """The heads `members` (trained on caches like `cache`) averaged as one model of the
    cache's features (`EnsembleHead`); on a block cache, each runs on its own blocks from the
    cached one (the tuned ones on theirs, the others sharing the pretrained ones), with the
    backbone's weights (`weights` as in train) checked against the cache's."""
    spec = cache.spec.backbone
    tunings = [m.tuning for m in members]
    layout = None if spec.block is None else tail_layout(tunings, start=spec.block)
    heads = [m.build(device) for m in members]
    head = EnsembleHead(heads, None if layout is None else layout[1])
    if layout is None:
        return head
    backbone = matching_backbone(spec, weights, device, cache.path, "the cache", "extracted")
    states = [m.payload["state_dict"] for m in members]
    backbone.set_tails(member_tails(backbone, tunings, states, layout))
    return TailsModel(backbone, head, cache.spec.preprocessing.grid).to(device).eval()
