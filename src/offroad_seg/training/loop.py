"""Stage 2: train a segmentation head on cached features.

Read top to bottom: open and check the caches, pick the feature source (in memory or on the
GPU when the cache fits the budget, streamed chunk by chunk otherwise), build the head, then
the epoch loop: train steps, validation from one confusion matrix, checkpoints and stats.
The sample order is a pure function of (seed, epoch), so `--resume` continues exactly where an
uninterrupted run would be, and an online loop with the same order gives the same losses.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from offroad_seg import __version__
from offroad_seg.config import TrainConfig, apply_preset
from offroad_seg.core import distributed
from offroad_seg.core.atomic import write_json_atomic, write_text_atomic
from offroad_seg.core.distributed import SINGLE, World, rank_seed
from offroad_seg.core.runtime import autocast, grad_scaler, resolve_device
from offroad_seg.errors import (
    CacheError,
    ConfigError,
    Interrupted,
    OffroadSegError,
    TrainingDiverged,
)
from offroad_seg.features.cache import FeatureCache
from offroad_seg.metrics.confusion import ConfusionAccumulator, SegMetrics
from offroad_seg.metrics.hackathon import (
    HackathonMetrics,
    hackathon_image_counts,
    hackathon_prediction,
    hackathon_scores,
)
from offroad_seg.models.checkpoint import DIGEST_KEY, head_payload, load_checkpoint, save_checkpoint
from offroad_seg.models.heads import HeadConfig, build_head
from offroad_seg.models.upsampling import predict_and_score
from offroad_seg.training.holdout import check_holdout
from offroad_seg.training.losses import Criterion, LossSpec, loss_terms, parse_class_weights
from offroad_seg.training.run_folder import (
    CONFIG_FILE,
    FINISHED,
    HEAD_FILE,
    HISTORY_FILE,
    LAST_FILE,
    STATS_DIR,
    RunPlan,
    config_dict,
    missing_outputs,
    output_lock,
    plan_run,
)
from offroad_seg.training.sources import (
    FeatureTensors,
    InMemorySource,
    StreamingSource,
    choose_source,
    rank_slices,
    view0_features,
)

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


def make_optimizer(head: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (fused: one kernel for all parameters, ~5x faster steps on CPU); norms, biases
    and layer scales are not decayed."""
    decay, no_decay = [], []
    for name, p in head.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith("gamma") else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, fused=True)


# ----------------------------------------------------------------------------- validation


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


# ----------------------------------------------------------------------------- checks


def open_train_caches(cfg: TrainConfig) -> tuple[list[FeatureCache], FeatureCache | None]:
    if not cfg.caches:
        raise ConfigError("no training cache given")
    caches = [FeatureCache.open(p) for p in cfg.caches]
    val = FeatureCache.open(cfg.val_cache) if cfg.val_cache else None
    for cache in caches + ([val] if val else []):
        cache.require_complete()
    first = caches[0]
    for other in caches[1:] + ([val] if val else []):
        if other.spec.compat_fingerprint != first.spec.compat_fingerprint:
            diff = "; ".join(first.spec.differences(other.spec, compat_only=True)[:3])
            raise CacheError(
                f"{other.path}: cannot be used with {first.path}: its features differ ({diff})"
            )
    check_holdout(caches, val)
    return caches, val


# ----------------------------------------------------------------------------- stats


def history_csv(history: list[dict]) -> str:
    """Rows of dicts as CSV, the union of their keys as columns (None: empty)."""
    keys = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in keys})
    return buf.getvalue()


def stats_text(
    history: list[dict], best: dict | None, final_metrics: SegMetrics | None, run: dict
) -> str:
    """evaluation_metrics.txt: the run's settings, final and best values and a per-epoch table,
    as the seed wrote."""
    last = history[-1]
    lines = ["Training results", "================", "", *settings_lines(run), ""]
    lines.append(f"Epochs: {last['epoch']}")
    lines.append(f"Final train loss: {last['train_loss']:.4f}")
    has_val = last.get("val_miou") is not None
    if has_val:
        lines += [
            f"Final val loss: {last['val_loss']:.4f}",
            f"Final val mIoU: {last['val_miou']:.4f}",
            f"Final val Dice: {last['val_dice']:.4f}",
            f"Final val pixel accuracy: {last['val_pixel_acc']:.4f}",
        ]
    if best is not None:
        lines += [
            "",
            f"Best val mIoU: {best['val_miou']:.4f} (epoch {best['epoch']})",
            f"Best val Dice: {max(r['val_dice'] for r in history):.4f}",
            f"Best val pixel accuracy: {max(r['val_pixel_acc'] for r in history):.4f}",
            f"Lowest val loss: {min(r['val_loss'] for r in history):.4f}",
        ]
    lines += ["", "Per-epoch history", "-----------------"]
    header = f"{'epoch':>5} {'train_loss':>10}"
    if has_val:
        header += f" {'val_loss':>9} {'val_mIoU':>9} {'val_Dice':>9} {'val_acc':>8}"
    lines.append(header + f" {'seconds':>8}")
    for r in history:
        row = f"{r['epoch']:>5} {r['train_loss']:>10.4f}"
        if has_val:
            row += (
                f" {r['val_loss']:>9.4f} {r['val_miou']:>9.4f} {r['val_dice']:>9.4f}"
                f" {r['val_pixel_acc']:>8.4f}"
            )
        lines.append(row + f" {r['seconds']:>8.2f}")
    if final_metrics is not None:
        lines += ["", final_metrics.table("Best checkpoint on the validation cache")]
    if run.get("val_hackathon"):
        hackathon = HackathonMetrics.from_dict(run["val_hackathon"])
        lines += ["", "Best checkpoint, " + hackathon.table()]
    return "\n".join(lines) + "\n"


def write_stats(
    out: Path, history: list[dict], best: dict | None, final: SegMetrics | None, run: dict
) -> None:
    from offroad_seg.reporting.plots import plot_per_class_metrics, plot_training_curves

    stats = out / STATS_DIR
    stats.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stats / "history.csv", history_csv(history))
    write_text_atomic(stats / "evaluation_metrics.txt", stats_text(history, best, final, run))
    name = run_name(out)
    plot_training_curves(history, stats / "training_curves.png", title=name)
    if final is not None:
        title = f"{name}: per-class metrics (best epoch, validation cache)"
        plot_per_class_metrics(
            final.names, final.iou, final.dice, stats / "per_class_metrics.png", title=title
        )
    # last: its mark says that every output above is written (a run killed before is not done)
    write_json_atomic(stats / HISTORY_FILE, {"history": history, "best": best, FINISHED: True})


def run_name(out: Path) -> str:
    """How plots name a run: its folder, with the parent for context (runs/h1)."""
    out = Path(out).resolve()
    return f"{out.parent.name}/{out.name}" if out.parent.name else out.name


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
) -> tuple[list[float], float]:
    """One pass over the source; returns each step's loss (over the global batch) and the
    last learning rate. `scaler`: loss scaling for fp16 autocast (see runtime.grad_scaler)."""
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
            group["lr"] = lr
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
        losses[n] = logged
        n += 1
        step += 1
        bar.update(1)
    bar.close()
    return losses[:n].tolist(), lr


def _rng_state(device: torch.device) -> dict:
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


def check_config(cfg: TrainConfig) -> None:
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise ConfigError("epochs and batch size must be >= 1 and the learning rate > 0")
    LossSpec.parse(cfg.loss, cfg.focal_gamma)  # a bad loss fails before any work starts


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
    caches, val, source, device = data.caches, data.val, data.source, data.device
    spec = caches[0].spec
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
    if world.rank:  # own dropout masks per rank; rank 0 goes on as one process would
        torch.manual_seed(rank_seed(cfg.seed, world.rank))
    model = head
    if world.enabled:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(head, device_ids=ids)
    optimizer = make_optimizer(head, cfg.lr, cfg.weight_decay)
    scaler = grad_scaler(device)
    steps_per_epoch = len(rank_slices(source.num_images, cfg.batch_size, world))
    total_steps = cfg.epochs * steps_per_epoch
    warmup = warmup_steps(cfg.warmup_epochs, steps_per_epoch, total_steps)
    train_fps, val_fp = data.fingerprints

    run = run_record(cfg, head_cfg, spec, train_fps, val_fp, weights_np, world)
    base_payload = head_payload(
        head_cfg,
        class_map,
        spec.backbone,
        spec.preprocessing,
        train_config=config_dict(cfg),
        train_caches=train_fps,
        val_cache=val_fp,
        class_weights=run["class_weights"],
        world_size=world.size,
    )

    history: list[dict] = []
    step_losses: list[float] = []
    best: dict | None = None
    start_epoch = 1
    completing: list[str] = []  # a trained run's outputs that this session writes
    last = plan.last
    if cfg.resume:
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
        history, best = last["history"], last["best"]
        start_epoch = last["epoch"] + 1
        if start_epoch > cfg.epochs:
            completing = missing_outputs(cfg.out, val is not None)
            if not completing:
                if world.is_main:
                    log.info("%s: all %d epochs trained; nothing to do", cfg.out, cfg.epochs)
                return TrainResult(cfg.out, history, best, 0.0, source.kind, [], 0, cfg)
            if world.is_main:
                log.info(
                    "%s: all %d epochs are trained; writing what is missing (%s)",
                    cfg.out, cfg.epochs, ", ".join(completing),
                )  # fmt: skip
        else:
            head.load_state_dict(last["state_dict"])
            optimizer.load_state_dict(last["optimizer"])
            if last.get("scaler"):  # fp16 runs (a disabled scaler saves nothing)
                scaler.load_state_dict(last["scaler"])
            _set_rng_state(_rng_for_rank(last["rng"], world), device)
            if world.is_main:
                log.info("resuming %s at epoch %d of %d", cfg.out, start_epoch, cfg.epochs)
    if world.is_main and not (completing and (cfg.out / STATS_DIR / CONFIG_FILE).is_file()):
        (cfg.out / STATS_DIR).mkdir(parents=True, exist_ok=True)
        write_json_atomic(cfg.out / STATS_DIR / CONFIG_FILE, run)

    saved_epoch = start_epoch - 1
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            epoch_losses, lr = train_one_epoch(
                model, optimizer, source, cfg, epoch, steps_per_epoch, warmup, criterion,
                device, world, scaler,
            )  # fmt: skip
            step_losses += epoch_losses
            row: dict = {"epoch": epoch, "train_loss": sum(epoch_losses) / len(epoch_losses)}
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
            row["lr"] = lr
            row["seconds"] = time.perf_counter() - t0
            check_finite(cfg, epoch, saved_epoch, epoch_losses, row, head)
            history.append(row)
            if metrics is not None and (best is None or row["val_miou"] > best["val_miou"]):
                best = {"epoch": epoch, **{k: v for k, v in row.items() if k.startswith("val_")}}
            rng = world.gather(_rng_state(device))  # every rank's, for an exact resume
            if world.is_main:
                log.info(_epoch_line(row, cfg.epochs))
                payload = {
                    **base_payload,
                    "state_dict": head.state_dict(),
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
                    "optimizer": optimizer.state_dict(),
                    "rng": rng,
                    "scaler": scaler.state_dict(),
                }
                save_checkpoint(
                    cfg.out / LAST_FILE, {**payload, "history": history, **resume_state}
                )
                write_json_atomic(
                    cfg.out / STATS_DIR / HISTORY_FILE, {"history": history, "best": best}
                )
            saved_epoch = epoch
            world.barrier()
            if on_epoch is not None:
                on_epoch(row)
    except KeyboardInterrupt:
        if saved_epoch == 0:
            raise Interrupted("interrupted before the first epoch ended; nothing saved") from None
        raise Interrupted(
            f"interrupted: {cfg.out / LAST_FILE} holds epoch {saved_epoch} of {cfg.epochs}; "
            "rerun the same command with --resume to continue"
        ) from None

    if world.is_main:
        final = None
        if completing and not (cfg.out / HEAD_FILE).is_file():
            rebuild_head(cfg.out, last, with_val=val is not None)
        if val is not None:  # the best epoch's validation, saved with its head (maybe by an
            # earlier run that this one resumed): no second pass over the val cache
            saved = load_checkpoint(cfg.out / HEAD_FILE).payload
            final = SegMetrics.from_dict(saved["val_metrics"])
            if "val_hackathon" in saved:
                run = {**run, "val_hackathon": saved["val_hackathon"]}
        write_stats(cfg.out, history, best, final, run)
    world.barrier()
    trained = cfg.epochs - start_epoch + 1
    return TrainResult(
        cfg.out, history, best, 0.0, source.kind, step_losses, trained, cfg, completing
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


def rebuild_head(out: Path, last: dict, with_val: bool) -> None:
    """segmentation_head.pth of a trained run, from its last.pth when that is the same head
    (no validation: the head is the last epoch's); with validation the best epoch's weights
    are gone with the file."""
    if with_val:
        raise OffroadSegError(
            f"{out / HEAD_FILE}: missing, and the best epoch's head cannot be rebuilt without "
            "training; use --overwrite to train again"
        )
    resume_only = ("history", "optimizer", "rng", "scaler", DIGEST_KEY)
    save_checkpoint(out / HEAD_FILE, {k: v for k, v in last.items() if k not in resume_only})


def run_record(
    cfg: TrainConfig,
    head_cfg: HeadConfig,
    spec,
    train_fps: list[str],
    val_fp: str | None,
    weights_np,
    world: World,
) -> dict:
    """train_stats/config.json: everything the run was (settings with the preset and resume
    applied, the head as built, caches and their fingerprints, backbone, preprocessing)."""
    return {
        "tool_version": __version__,
        "settings": config_dict(cfg),
        "head": head_cfg.to_dict(),
        "backbone": spec.backbone.to_dict(),
        "preprocessing": spec.preprocessing.to_dict(),
        "class_map": spec.class_map.names,
        "train_caches": [
            {"path": str(p), "fingerprint": fp} for p, fp in zip(cfg.caches, train_fps, strict=True)
        ],
        "val_cache": {"path": str(cfg.val_cache), "fingerprint": val_fp} if val_fp else None,
        "class_weights": weights_np.tolist() if weights_np is not None else None,
        "world_size": world.size,
    }


def settings_lines(run: dict) -> list[str]:
    """A run's settings, for the header of evaluation_metrics.txt and `offroad-seg info`."""
    s, head, bb = run["settings"], run["head"], run["backbone"]
    shape = []
    if head.get("width"):
        shape.append(f"width {head['width']}")
    if head.get("depth"):
        shape.append(f"depth {head['depth']}")
    shape.append(f"dropout {head['dropout']:g}")
    lines = [
        f"run: {s['out']}" + (f" (preset {s['preset']})" if s.get("preset") else ""),
        f"head: {head['name']} ({', '.join(shape)})",
        f"backbone: {bb['name']} layers={bb['layers']} ({bb['channels']} channels), "
        f"weights {bb['weights_source']}",
        f"size: {'x'.join(str(v) for v in run['preprocessing']['size'])}",
        f"loss: {s['loss']}"
        + (f" (focal gamma {s['focal_gamma']:g})" if "focal" in s["loss"] else "")
        + f", class weights {s['class_weights']}",
        f"optimizer: AdamW lr {s['lr']:g}, weight decay {s['weight_decay']:g}, "
        f"batch {s['batch_size']}, {s['epochs']} epochs, warmup {s['warmup_epochs']:g}, "
        f"seed {s['seed']}",
        f"train caches: {', '.join(c['path'] for c in run['train_caches'])}",
        f"val cache: {run['val_cache']['path'] if run['val_cache'] else 'none'}",
    ]
    return lines


def _epoch_line(row: dict, epochs: int) -> str:
    text = f"epoch {row['epoch']:>3}/{epochs}  train_loss {row['train_loss']:.4f}"
    if row.get("val_miou") is not None:
        text += (
            f"  val_loss {row['val_loss']:.4f}  val_mIoU {row['val_miou']:.4f}"
            f"  val_Dice {row['val_dice']:.4f}  val_acc {row['val_pixel_acc']:.4f}"
        )
    return text + f"  ({row['seconds']:.2f} s)"
