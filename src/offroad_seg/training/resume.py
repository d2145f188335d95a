"""Continuing a run from its last.pth: the checks that it is the same run, and restoring its
head, optimizer, loss scaler and every rank's RNG so that the resumed epochs are the ones an
uninterrupted run trains, bit for bit. A run whose epochs are all trained resumes to write
the outputs it is missing."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from offroad_seg.config import TrainConfig
from offroad_seg.core.distributed import World
from offroad_seg.errors import CacheError
from offroad_seg.training.inputs import TrainingData
from offroad_seg.training.run_folder import LAST_FILE, missing_outputs

log = logging.getLogger(__name__)


@dataclass
class ResumePoint:
    """Where a session of a run starts."""

    history: list[dict] = field(default_factory=list)  # the epochs trained before
    best: dict | None = None
    epoch: int = 1  # the first epoch to train
    completing: list[str] = field(default_factory=list)  # a trained run's missing outputs
    finished: bool = False  # every epoch trained and every output written: nothing to do


def resume_point(
    cfg: TrainConfig,
    last: dict | None,
    data: TrainingData,
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    world: World,
) -> ResumePoint:
    """Epoch 1 for a fresh run. A resumed one must have been trained and validated on the
    same caches; with epochs left, its head, optimizer, loss scaler and this rank's RNG are
    loaded from `last` (after the head was built: building it draws from the RNG)."""
    if not cfg.resume:
        return ResumePoint()
    train_fps, val_fp = data.fingerprints
    if last["train_caches"] != train_fps:
        raise CacheError(
            f"{cfg.out / LAST_FILE}: was trained on other caches than "
            f"{', '.join(str(p) for p in cfg.caches)}; cannot resume"
        )
    if last["val_cache"] != val_fp:
        raise CacheError(
            f"{cfg.out / LAST_FILE}: was validated on another cache than "
            f"{cfg.val_cache}; cannot resume"
        )
    start = ResumePoint(last["history"], last["best"], last["epoch"] + 1)
    if start.epoch > cfg.epochs or last.get("stopped_early"):
        start.epoch = cfg.epochs + 1  # a run that stopped early has no epoch left either
        start.completing = missing_outputs(cfg.out, data.val is not None)
        if not start.completing:
            # said once, by the caller's summary ("all N epochs were already trained")
            start.finished = True
            return start
        if world.is_main:
            log.info(
                "%s: %s; writing what is missing (%s)",
                cfg.out, trained_epochs(last, cfg.epochs), ", ".join(start.completing),
            )  # fmt: skip
    else:
        # with --ema, last.pth's head is the average and the trained weights are kept beside
        head.load_state_dict(last.get("trained_state_dict", last["state_dict"]))
        optimizer.load_state_dict(last["optimizer"])
        if last.get("scaler"):  # fp16 runs (a disabled scaler saves nothing)
            scaler.load_state_dict(last["scaler"])
        _set_rng_state(_rng_for_rank(last["rng"], world), data.device)
        if world.is_main:
            log.info("resuming %s at epoch %d of %d", cfg.out, start.epoch, cfg.epochs)
    return start


def trained_epochs(last: dict, epochs: int) -> str:
    """What a run whose training is over trained: all its epochs, or fewer (--patience)."""
    if last.get("stopped_early") and last["epoch"] < epochs:
        return f"training stopped early at epoch {last['epoch']} of {epochs} (--patience)"
    return f"all {epochs} epochs trained"


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _rng_for_rank(saved: dict | list[dict], world: World) -> dict:
    """A rank's saved RNG state (ranks draw different dropout masks); a run resumed with a
    different number of ranks continues from rank 0's."""
    if isinstance(saved, dict):
        return saved
    if len(saved) != world.size:
        log.warning("resumed with %d ranks, saved with %d: RNG of rank 0", world.size, len(saved))
        return saved[0]
    return saved[world.rank]


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
