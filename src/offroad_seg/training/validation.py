"""A head scored on a validation cache during training: the segmentation metrics from one
confusion matrix (with the training criterion as the loss), and the hackathon protocol for
comparison with published numbers. Under DDP each rank scores every K-th image and the
results are reduced over the ranks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from offroad_seg.core.distributed import SINGLE, World
from offroad_seg.core.runtime import autocast
from offroad_seg.features.cache import FeatureCache
from offroad_seg.metrics.confusion import ConfusionAccumulator, SegMetrics
from offroad_seg.metrics.hackathon import (
    HackathonMetrics,
    hackathon_image_counts,
    hackathon_prediction,
    hackathon_scores,
)
from offroad_seg.models.upsampling import predict_and_score
from offroad_seg.training.losses import loss_terms
from offroad_seg.training.sources import FeatureTensors, view0_features

if TYPE_CHECKING:
    from offroad_seg.training.inputs import TrainingData


@torch.no_grad()
def evaluate_on_cache(
    head: nn.Module,
    cache: FeatureCache,
    device: torch.device,
    weight: torch.Tensor | None,
    batch_size: int = 16,
    features: tuple[FeatureTensors, torch.Tensor] | None = None,
    world: World = SINGLE,
) -> SegMetrics:
    """View-0 predictions at the working size against the cached labels: one confusion
    matrix over the split (each rank takes every K-th image; the sums are reduced), and the
    training criterion as the loss."""
    was_training = head.training
    head.eval()
    acc = ConfusionAccumulator(cache.spec.class_map.num_classes, device)
    feats, labels = features if features is not None else view0_features(cache)
    mine = torch.arange(world.rank, len(feats), world.size)
    for s in range(0, len(mine), batch_size):
        idx = mine[s : s + batch_size]
        f = feats.take(idx.to(feats.values.device)).to(device, non_blocking=True).float()
        lab = labels[idx.to(labels.device)].to(device, non_blocking=True)
        with autocast(device):
            logits = head(f)
        total, count = loss_terms(logits, lab, weight)
        acc.add_loss(total, count)
        pred, _, _ = predict_and_score(logits.float(), None, tuple(lab.shape[-2:]))
        acc.update(pred, lab)
    for t in (acc.matrix, acc.loss_sum, acc.loss_weight):
        world.all_reduce_sum(t)
    head.train(was_training)
    return acc.compute(cache.spec.class_map.names)


@torch.no_grad()
def hackathon_on_cache(
    head: nn.Module,
    cache: FeatureCache,
    features: tuple[FeatureTensors, torch.Tensor],
    labels: torch.Tensor,
    device: torch.device,
    world: World = SINGLE,
    batch_size: int = 16,
) -> HackathonMetrics:
    """The hackathon protocol on a validation cache (its stored protocol labels, predictions
    at the working size), for comparison with published numbers: each rank scores every K-th
    image and the per-image counts are gathered."""
    was_training = head.training
    head.eval()
    feats = features[0]
    size = tuple(labels.shape[-2:])
    class_map = cache.spec.class_map
    mine = torch.arange(world.rank, len(feats), world.size)
    counts: dict[int, list[int]] = {}
    for s in range(0, len(mine), batch_size):
        idx = mine[s : s + batch_size]
        f = feats.take(idx.to(feats.values.device)).to(device, non_blocking=True).float()
        with autocast(device):
            logits = head(f)
        preds = hackathon_prediction(logits.float(), size, class_map)
        for j, i in enumerate(idx.tolist()):
            counts[i] = hackathon_image_counts(preds[j], labels[i].to(preds.device)).tolist()
    head.train(was_training)
    merged: dict[int, list[int]] = {}
    for part in world.gather(counts):
        merged.update(part)
    names = list(cache.spec.names)
    return hackathon_scores(names, [np.asarray(merged[i]) for i in range(len(names))])


def validate_epoch(
    head: nn.Module, data: TrainingData, weight: torch.Tensor | None, world: World, row: dict
) -> tuple[SegMetrics | None, HackathonMetrics | None]:
    """An epoch's validation (none without a val cache; the hackathon protocol only when the
    cache holds its labels), its numbers added to the epoch's history `row`."""
    val, device = data.val, data.device
    metrics = None
    if val is not None:
        metrics = evaluate_on_cache(
            head, val, device, weight, features=data.val_features, world=world
        )
        row.update(
            val_loss=metrics.loss,
            val_miou=metrics.miou,
            val_dice=metrics.mean_dice,
            val_pixel_acc=metrics.pixel_accuracy,
        )
    hackathon = None
    if val is not None and data.val_hackathon is not None:
        hackathon = hackathon_on_cache(
            head, val, data.val_features, data.val_hackathon, device, world
        )
        row.update(
            val_hackathon_miou=hackathon.miou,
            val_hackathon_dice=hackathon.dice,
            val_hackathon_pixel_acc=hackathon.pixel_accuracy,
        )
    return metrics, hackathon
