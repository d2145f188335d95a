"""Stage 2: train a segmentation head on cached features.

Read top to bottom: the schedule and optimizer, one epoch's steps, then `train` (lock and plan
the run folder, open the caches and pick the feature source: in memory or on the GPU when the
cache fits the budget, streamed chunk by chunk otherwise) and `_train`, the epoch loop: set up
the head, continue a resumed run, then train, validate, check and save each epoch, and write
the final stats. The pieces it calls live beside it: inputs (caches and features), resume,
validation, stats and run_folder.
The sample order is a pure function of (seed, epoch), so `--resume` continues exactly where an
uninterrupted run would be, and an online loop with the same order gives the same losses.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from offroad_seg.config import TrainConfig, apply_preset
from offroad_seg.core import distributed
from offroad_seg.core.atomic import write_json_atomic
from offroad_seg.core.distributed import SINGLE, World, rank_seed
from offroad_seg.core.runtime import autocast, grad_scaler, resolve_device
from offroad_seg.errors import ConfigError, Interrupted, TrainingDiverged
from offroad_seg.metrics.confusion import SegMetrics
from offroad_seg.metrics.hackathon import HackathonMetrics
from offroad_seg.models.checkpoint import head_payload, save_checkpoint
from offroad_seg.models.heads import HeadConfig, build_head
from offroad_seg.training.early_stop import EarlyStopping
from offroad_seg.training.ema import HeadEMA, check_decay
from offroad_seg.training.inputs import TrainingData, load_training_data
from offroad_seg.training.losses import Criterion, LossSpec, parse_class_weights
from offroad_seg.training.resume import resume_point, rng_state
from offroad_seg.training.run_folder import (
    CONFIG_FILE,
    HEAD_FILE,
    HISTORY_FILE,
    LAST_FILE,
    STATS_DIR,
    RunPlan,
    config_dict,
    output_lock,
    plan_run,
)
from offroad_seg.training.sources import batch_count
from offroad_seg.training.stats import run_record, write_final_stats, write_run_record
from offroad_seg.training.tensorboard_log import CurveLog, check_available
from offroad_seg.training.tuned import backbone_lr_scale, trained_model, tune_spec
from offroad_seg.training.validation import validate_epoch

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    out: Path
    history: list[dict]  # every epoch of the run, earlier sessions' too when resumed
    best: dict | None
    seconds: float
    source: str
    step_losses: list[float] = field(default_factory=list)  # this session's steps, in order
    epochs_trained: int = 0  # by this session (0: a resumed run that was already finished)
    config: TrainConfig | None = None  # the settings the run used (preset and resume applied)
    completed: list[str] = field(default_factory=list)  # outputs of a trained run written late
    stopped_early: bool = False  # --patience ended the run before its last epoch


# ----------------------------------------------------------------------------- pieces


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps(warmup_epochs: float, steps_per_epoch: int, total_steps: int) -> int:
    """Warmup length: `warmup_epochs` of steps, at most a tenth of the run, at least one."""
    return max(1, min(int(warmup_epochs * steps_per_epoch), total_steps // 10 or 1))


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, backbone_scale: float = 1.0
) -> torch.optim.Optimizer:
    """AdamW (fused: one kernel for all parameters, ~5x faster steps on CPU) over the
    trainable parameters; norms, biases and layer scales are not decayed. A tuned model's
    blocks and norm take `backbone_scale` times the learning rate (each group's `lr_scale`)."""
    groups: dict[tuple[float, bool], list] = {(1.0, True): [], (1.0, False): []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = model.lr_scale(name, backbone_scale) if hasattr(model, "lr_scale") else 1.0
        decay = not (p.ndim <= 1 or name.endswith("gamma"))
        groups.setdefault((scale, decay), []).append(p)
    params = [
        {"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        for (scale, decay), ps in groups.items()
    ]
    return torch.optim.AdamW(params, lr=lr, fused=True)


# ----------------------------------------------------------------------------- training


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    source,
    cfg: TrainConfig,
    epoch: int,
    steps_per_epoch: int,
    warmup: int,
    criterion: Criterion,
    device: torch.device,
    world: World = SINGLE,
    scaler: torch.amp.GradScaler | None = None,
    ema: HeadEMA | None = None,
) -> tuple[list[float], float]:
    """One pass over the source; returns each step's loss (over the global batch) and the
    last learning rate. `scaler`: loss scaling for fp16 autocast (see runtime.grad_scaler);
    `ema`: the head's weight average, updated after every step."""
    scaler = scaler if scaler is not None else torch.amp.GradScaler(enabled=False)
    model.train()
    total_steps = cfg.epochs * steps_per_epoch
    step = (epoch - 1) * steps_per_epoch
    # Step losses stay on the device (no host sync per step), in one tensor made up front:
    # thousands of small long-lived tensors would pin the heap between the large transient
    # ones and make memory grow all epoch (glibc fragmentation).
    losses = torch.zeros(steps_per_epoch, dtype=torch.float32, device=device)
    lr, n = cfg.lr, 0
    bar = tqdm(
        total=steps_per_epoch,
        desc=f"epoch {epoch}/{cfg.epochs}",
        unit="step",
        disable=None if cfg.progress and world.is_main else True,
        leave=False,
    )
    for feats, labels in source.batches(cfg.seed, epoch, cfg.batch_size, world):
        lr = lr_at(step, total_steps, warmup, cfg.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        with autocast(device):
            logits = model(feats)
        parts = criterion(logits, labels)
        if world.enabled:
            # normalise the per-pixel terms by the global batch's pixel weight: DDP's gradient
            # average then equals the one-process gradient of the whole global batch; the
            # set-level terms (dice, lovasz) are each rank's own batch, averaged by DDP
            sums = world.all_reduce_sum(
                torch.stack([parts.pixel_sum.detach(), parts.pixel_weight.detach(),
                             parts.set_terms.detach()])
            )  # fmt: skip
            weight_sum = sums[1].clamp_min(1e-12)
            loss = parts.pixel_sum * world.size / weight_sum + parts.set_terms
            logged = sums[0] / weight_sum + sums[2] / world.size
        else:
            loss = parts.value()
            logged = loss.detach()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # a plain step when disabled
        scaler.update()
        if ema is not None:
            ema.update()
        losses[n] = logged
        n += 1
        step += 1
        bar.update(1)
    bar.close()
    return losses[:n].tolist(), lr


def check_config(cfg: TrainConfig) -> None:
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise ConfigError("epochs and batch size must be >= 1 and the learning rate > 0")
    LossSpec.parse(cfg.loss, cfg.focal_gamma)  # a bad loss fails before any work starts
    EarlyStopping(cfg.patience)
    if cfg.patience and cfg.val_cache is None:
        raise ConfigError(f"--patience {cfg.patience} stops on val mIoU: it needs --val-cache")
    check_decay(cfg.ema)
    if cfg.tensorboard is not None:
        check_available()


def train(
    cfg: TrainConfig,
    data: TrainingData | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    world: World | None = None,
) -> TrainResult:
    """Train a head on cached features; see the module docstring. `data` (from
    `load_training_data`) reuses features already loaded for the same caches; `on_epoch`
    sees each epoch's history row (a sweep prunes from it by raising). Under torchrun the
    ranks train one DDP model: each computes its slice of every global batch, metrics are
    reduced over ranks, and only rank 0 writes checkpoints and stats; `world=SINGLE` trains
    in this process alone even under torchrun (a sweep's ranks run trials of their own)."""
    started = time.perf_counter()
    if not cfg.resume:
        check_config(apply_preset(cfg))  # bad settings fail before the folder is touched
    device = resolve_device(cfg.device)
    launch = distributed.launched(device) if world is None else contextlib.nullcontext(world)
    with launch as world, output_lock(cfg.out, world):
        plan = plan_run(cfg)  # every rank reads the folder before rank 0 changes it
        cfg = plan.cfg
        check_config(cfg)
        if world.enabled and cfg.batch_size < world.size:
            raise ConfigError(f"batch size {cfg.batch_size} is smaller than {world.size} ranks")
        if data is None:
            data = load_training_data(cfg, world.device(device), world)
        elif [str(c.path) for c in data.caches] != [str(p) for p in cfg.caches]:
            raise ConfigError("the loaded training data is for other caches than the config's")
        world.barrier()
        if world.is_main:
            plan.clean()
        result = _train(cfg, data, world, on_epoch, plan)
    result.seconds = time.perf_counter() - started
    return result


def _train(
    cfg: TrainConfig,
    data: TrainingData,
    world: World,
    on_epoch: Callable[[dict], None] | None,
    plan: RunPlan,
) -> TrainResult:
    """The run itself, once its folder is planned: build the head, continue where a resumed
    run stopped, then train, validate and save epoch after epoch, and write the final stats."""
    setup = _set_up(cfg, data, world)
    start = resume_point(cfg, plan.last, data, setup.head, setup.optimizer, setup.scaler, world)
    stopped = bool(plan.last and plan.last.get("stopped_early"))  # by an earlier session
    if start.finished:
        return TrainResult(
            cfg.out, start.history, start.best, 0.0, data.source.kind, [], 0, cfg, [], stopped
        )
    if setup.ema is not None and cfg.resume and not start.completing:
        setup.ema.load_state_dict(plan.last["state_dict"])  # last.pth's head is the average
    if world.is_main and not (start.completing and (cfg.out / STATS_DIR / CONFIG_FILE).is_file()):
        write_run_record(cfg.out, setup.run)

    history, best = start.history, start.best
    step_losses: list[float] = []
    saved_epoch = start.epoch - 1
    curves = CurveLog(cfg.tensorboard if world.is_main and not start.completing else None,
                      start.epoch)  # fmt: skip
    try:
        for epoch in range(start.epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            epoch_losses, lr = train_one_epoch(
                setup.model, setup.optimizer, data.source, cfg, epoch, setup.steps_per_epoch,
                setup.warmup, setup.criterion, data.device, world, setup.scaler, setup.ema,
            )  # fmt: skip
            step_losses += epoch_losses
            row: dict = {"epoch": epoch, "train_loss": sum(epoch_losses) / len(epoch_losses)}
            metrics, hackathon = validate_epoch(setup.deployed, data, setup.weight, world, row)
            row["lr"] = lr
            row["seconds"] = time.perf_counter() - t0
            check_finite(cfg, epoch, saved_epoch, epoch_losses, row, setup.deployed)
            history.append(row)
            if metrics is not None and (best is None or row["val_miou"] > best["val_miou"]):
                best = {"epoch": epoch, **{k: v for k, v in row.items() if k.startswith("val_")}}
            stopped = setup.stopper.should_stop(epoch, best)
            _save_epoch(
                cfg, setup, world, data.device, row, history, best, metrics, hackathon, stopped
            )
            saved_epoch = epoch
            curves.epoch(row)
            world.barrier()
            if on_epoch is not None:
                on_epoch(row)
            if stopped:
                if world.is_main:
                    log.info(setup.stopper.reason(epoch, best))
                break
    except KeyboardInterrupt:
        raise _interrupted(cfg, saved_epoch) from None
    finally:
        curves.close()

    if world.is_main:
        last = plan.last if start.completing else None  # a trained run's, to rebuild its head
        write_final_stats(cfg.out, history, best, setup.run, data.val is not None, last)
    world.barrier()
    trained = 0 if start.completing else history[-1]["epoch"] - start.epoch + 1
    return TrainResult(
        cfg.out, history, best, 0.0, data.source.kind, step_losses, trained, cfg,
        start.completing, stopped,
    )  # fmt: skip


@dataclass
class _Setup:
    """What a run trains with, built before its first epoch (and before a resumed run's state
    is loaded into it)."""

    head: nn.Module  # what trains: the head, or a TunedModel (blocks + norm + head)
    model: nn.Module  # the head, or its DDP wrapper under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: Criterion
    weight: torch.Tensor | None  # the class weights, for the validation loss too
    steps_per_epoch: int
    warmup: int
    run: dict  # the run record, train_stats/config.json
    base_payload: dict  # what every checkpoint of the run holds besides its weights
    ema: HeadEMA | None  # the average of the head's weights (--ema), or None
    stopper: EarlyStopping

    @property
    def deployed(self) -> nn.Module:
        """The head that is validated and saved: the weight average when there is one."""
        return self.ema.average if self.ema is not None else self.head


def _set_up(cfg: TrainConfig, data: TrainingData, world: World) -> _Setup:
    """The criterion, the head (seeded: the same settings build the same weights), the
    optimizer and schedule, the run record and the checkpoints' common payload."""
    caches, source, device = data.caches, data.source, data.device
    spec = data.working_spec  # the head's working size: the val cache's, else the first's
    train_sizes = [list(size) for size in data.train_sizes]
    class_map = spec.class_map
    class_pixels = sum(c.class_pixels() for c in caches)
    weights_np = parse_class_weights(cfg.class_weights, class_pixels)
    weight = None
    if weights_np is not None:
        weight = torch.tensor(weights_np, dtype=torch.float32, device=device)
    criterion = Criterion(LossSpec.parse(cfg.loss, cfg.focal_gamma), weight)

    head_cfg = HeadConfig(
        name=cfg.head,
        in_channels=spec.backbone.channels,
        layers=spec.backbone.layers,
        num_classes=class_map.num_classes,
        width=cfg.width,
        depth=cfg.depth,
        dropout=cfg.dropout,
    )
    torch.manual_seed(cfg.seed)
    head = build_head(head_cfg).to(device)
    tuning = tune_spec(cfg, caches[0])
    head = trained_model(cfg, caches[0], head, tuning, device)  # LoRA draws from the RNG too
    if world.rank:  # own dropout masks per rank; rank 0 goes on as one process would
        torch.manual_seed(rank_seed(cfg.seed, world.rank))
    # the average copies the head as built, before DDP hooks its parameters
    ema = HeadEMA(head, cfg.ema) if cfg.ema > 0 else None
    model = head
    if world.enabled:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(head, device_ids=ids)
    optimizer = make_optimizer(head, cfg.lr, cfg.weight_decay, backbone_lr_scale(cfg))
    scaler = grad_scaler(device)
    steps_per_epoch = batch_count(source.group_sizes, cfg.batch_size, world)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = warmup_steps(cfg.warmup_epochs, steps_per_epoch, total_steps)
    train_fps, val_fp = data.fingerprints

    run = run_record(cfg, head_cfg, spec, train_fps, val_fp, weights_np, world, train_sizes)
    base_payload = head_payload(
        head_cfg,
        class_map,
        spec.backbone,
        spec.preprocessing,
        train_config=config_dict(cfg),
        train_caches=train_fps,
        val_cache=val_fp,
        train_sizes=train_sizes,
        class_weights=run["class_weights"],
        world_size=world.size,
        **({"tuning": tuning.to_dict()} if tuning is not None else {}),
    )
    return _Setup(
        head, model, optimizer, scaler, criterion, weight, steps_per_epoch, warmup, run,
        base_payload, ema, EarlyStopping(cfg.patience),
    )  # fmt: skip


def _save_epoch(
    cfg: TrainConfig,
    setup: _Setup,
    world: World,
    device: torch.device,
    row: dict,
    history: list[dict],
    best: dict | None,
    metrics: SegMetrics | None,
    hackathon: HackathonMetrics | None,
    stopped: bool = False,
) -> None:
    """An epoch's outputs (rank 0): the head when it is the best so far (or there is no
    validation), last.pth with everything a resume needs, and history.json. With --ema both
    checkpoints' head is the weight average; last.pth keeps the trained weights beside it.
    `stopped`: early stopping ends the run with this epoch (last.pth says so)."""
    epoch = row["epoch"]
    rng = world.gather(rng_state(device))  # every rank's, for an exact resume
    if world.is_main:
        log.info(_epoch_line(row, cfg.epochs))
        payload = {
            **setup.base_payload,
            "state_dict": setup.deployed.state_dict(),
            "epoch": epoch,
            "metrics": row,
            "best": best,
        }
        if metrics is None or best["epoch"] == epoch:  # the best so far, or the latest
            extra = {"val_metrics": metrics.to_dict()} if metrics is not None else {}
            if hackathon is not None:
                extra["val_hackathon"] = hackathon.to_dict()
            save_checkpoint(cfg.out / HEAD_FILE, {**payload, **extra})
        resume_state = {
            "optimizer": setup.optimizer.state_dict(),
            "rng": rng,
            "scaler": setup.scaler.state_dict(),
            "stopped_early": stopped,
        }
        if setup.ema is not None:
            resume_state["trained_state_dict"] = setup.head.state_dict()
        save_checkpoint(cfg.out / LAST_FILE, {**payload, "history": history, **resume_state})
        write_json_atomic(cfg.out / STATS_DIR / HISTORY_FILE, {"history": history, "best": best})


def _interrupted(cfg: TrainConfig, saved_epoch: int) -> Interrupted:
    if saved_epoch == 0:
        return Interrupted("interrupted before the first epoch ended; nothing saved")
    return Interrupted(
        f"interrupted: {cfg.out / LAST_FILE} holds epoch {saved_epoch} of {cfg.epochs}; "
        "rerun the same command with --resume to continue"
    )


def check_finite(
    cfg: TrainConfig,
    epoch: int,
    saved_epoch: int,
    losses: list[float],
    row: dict,
    head: nn.Module,
) -> None:
    """Stop a diverged run before it saves anything of this epoch: its losses, validation
    numbers and weights must all be finite (one device sync, for the weights, per epoch)."""
    if not all(math.isfinite(v) for v in losses):
        what = "the loss"
    elif not all(math.isfinite(v) for v in row.values() if isinstance(v, float)):
        what = "the validation metrics"
    elif not _weights_finite(head):
        what = "the weights"
    else:
        return
    if saved_epoch:
        kept = f"the last good checkpoint (epoch {saved_epoch}) is kept in {cfg.out / LAST_FILE}"
        again = "train again into another folder, or into this one with --overwrite"
    else:
        kept = "no epoch had been saved"
        again = "train again"
    raise TrainingDiverged(
        f"training diverged: {what} became NaN/inf at epoch {epoch}; {kept}; "
        f"lower --lr (it was {cfg.lr:g}) and {again}",
        epoch,
    )


def _weights_finite(head: nn.Module) -> bool:
    floats = [t for t in head.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in floats]).all())


def _epoch_line(row: dict, epochs: int) -> str:
    text = f"epoch {row['epoch']:>3}/{epochs}  train_loss {row['train_loss']:.4f}"
    if row.get("val_miou") is not None:
        text += (
            f"  val_loss {row['val_loss']:.4f}  val_mIoU {row['val_miou']:.4f}"
            f"  val_Dice {row['val_dice']:.4f}  val_acc {row['val_pixel_acc']:.4f}"
        )
    return text + f"  ({row['seconds']:.2f} s)"
