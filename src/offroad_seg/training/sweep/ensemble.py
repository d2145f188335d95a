"""`sweep --ensemble-top K`: the best K finished trials bundled into OUT/ensemble.pth, scored
on the sweep's validation cache as the trials are (cached features, view 0), and reported
beside the best single trial in OUT/ensemble.json and under the leaderboard."""

from __future__ import annotations

import logging

import torch

from offroad_seg.config import SweepConfig
from offroad_seg.core.atomic import write_json_atomic
from offroad_seg.features.cache import FeatureCache
from offroad_seg.models.checkpoint import load_checkpoint, save_checkpoint
from offroad_seg.models.ensemble import ensemble_payload
from offroad_seg.training.run_folder import HEAD_FILE
from offroad_seg.training.sweep.folder import ENSEMBLE_FILE, ENSEMBLE_SUMMARY, TRIALS_DIR
from offroad_seg.training.sweep.leaderboard import ensemble_line
from offroad_seg.training.tuned import cached_ensemble
from offroad_seg.training.validation import evaluate_on_cache

log = logging.getLogger(__name__)


def write_sweep_ensemble(cfg: SweepConfig, rows: list[dict], device: torch.device) -> dict | None:
    """OUT/ensemble.pth of the best `cfg.ensemble_top` completed trials of the leaderboard
    `rows` (fewer when fewer finished), and OUT/ensemble.json: its members and validation
    numbers beside the best trial's. None when no trial finished."""
    complete = [r for r in rows if r["state"] == "complete"][: cfg.ensemble_top]
    if not complete:
        return None
    if len(complete) < cfg.ensemble_top:
        log.warning("only %d trials finished: the ensemble has %d members", *[len(complete)] * 2)
    members = [load_checkpoint(cfg.out / TRIALS_DIR / r["run"] / HEAD_FILE) for r in complete]
    val_cache = FeatureCache.open(cfg.train.val_cache)
    model = cached_ensemble(members, val_cache, cfg.train.weights, device)
    weights = members[0].payload.get("class_weights")  # the trials' validation loss's
    weight = None if weights is None else torch.tensor(weights, device=device)
    metrics = evaluate_on_cache(model, val_cache, device, weight)
    val = {
        "val_miou": metrics.miou,
        "val_dice": metrics.mean_dice,
        "val_pixel_acc": metrics.pixel_accuracy,
        "val_loss": metrics.loss,
    }
    save_checkpoint(
        cfg.out / ENSEMBLE_FILE,
        ensemble_payload(members, ensemble_val=val, val_metrics=metrics.to_dict()),
    )
    summary = {
        "members": [r["run"] for r in complete],
        **val,
        "best_single": {"run": complete[0]["run"], "val_miou": complete[0]["val_miou"]},
    }
    write_json_atomic(cfg.out / ENSEMBLE_SUMMARY, summary)
    log.info(ensemble_line(summary))
    return summary
