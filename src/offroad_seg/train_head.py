"""Stage 2: train a segmentation head on cached features.

Read top to bottom: open and check the caches, pick the feature source (in memory or on the
GPU when the cache fits the budget, streamed chunk by chunk otherwise), build the head, then
the epoch loop: train steps, validation from one confusion matrix, checkpoints and stats.
The sample order is a pure function of (seed, epoch), so `--resume` continues exactly where an
uninterrupted run would be, and an online loop with the same order gives the same losses.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from offroad_seg import distributed
from offroad_seg.atomic import write_json_atomic, write_text_atomic
from offroad_seg.cache import FeatureCache
from offroad_seg.checkpoint import head_payload, load_checkpoint, save_checkpoint
from offroad_seg.config import TrainConfig
from offroad_seg.distributed import SINGLE, World, rank_seed
from offroad_seg.errors import CacheError, ConfigError, Interrupted, OffroadSegError
from offroad_seg.heads import HeadConfig, build_head
from offroad_seg.loss import loss_terms, parse_class_weights, predict_and_score
from offroad_seg.metrics import ConfusionAccumulator, SegMetrics
from offroad_seg.runtime import autocast, grad_scaler, resolve_device
from offroad_seg.sources import FeatureTensors, choose_source, rank_slices, view0_features

log = logging.getLogger(__name__)

HEAD_FILE = "segmentation_head.pth"
LAST_FILE = "last.pth"
STATS_DIR = "train_stats"


@dataclass
class TrainResult:
    out: Path
    history: list[dict]
    best: dict | None
    seconds: float
    source: str
    step_losses: list[float] = field(default_factory=list)  # this run's steps, in order


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
            diff = "; ".join(first.spec.differences(other.spec)[:3])
            raise CacheError(
                f"{other.path}: cannot be used with {first.path}: its features differ ({diff})"
            )
    return caches, val


def check_output_dir(cfg: TrainConfig) -> None:
    out = cfg.out
    existing = [p for p in (out / HEAD_FILE, out / LAST_FILE) if p.exists()]
    if existing and not (cfg.resume or cfg.overwrite):
        raise OffroadSegError(
            f"{out}: already holds a trained head ({existing[0].name}); "
            "use --resume to continue it or --overwrite to start over"
        )
    if cfg.resume and not (out / LAST_FILE).exists():
        raise OffroadSegError(f"{out / LAST_FILE}: nothing to resume")


# ----------------------------------------------------------------------------- stats


def history_csv(history: list[dict]) -> str:
    keys = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in keys})
    return buf.getvalue()


def stats_text(history: list[dict], best: dict | None, final_metrics: SegMetrics | None) -> str:
    """evaluation_metrics.txt: final and best values and a per-epoch table, as the seed wrote."""
    last = history[-1]
    lines = ["Training results", "================", ""]
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
    return "\n".join(lines) + "\n"


def write_stats(out: Path, history: list[dict], best: dict | None, final: SegMetrics | None):
    from offroad_seg.plots import plot_per_class_metrics, plot_training_curves

    stats = out / STATS_DIR
    stats.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stats / "history.csv", history_csv(history))
    write_json_atomic(stats / "history.json", {"history": history, "best": best})
    write_text_atomic(stats / "evaluation_metrics.txt", stats_text(history, best, final))
    plot_training_curves(history, stats / "training_curves.png")
    if final is not None:
        plot_per_class_metrics(final.names, final.iou, final.dice, stats / "per_class_metrics.png")


# ----------------------------------------------------------------------------- training


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    source,
    cfg: TrainConfig,
    epoch: int,
    steps_per_epoch: int,
    warmup: int,
    weight: torch.Tensor | None,
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
        total, count = loss_terms(logits, labels, weight)
        if world.enabled:
            # normalise by the global batch's pixel weight: DDP's gradient average then equals
            # the one-process gradient of the whole global batch
            sums = world.all_reduce_sum(torch.stack([total.detach(), count.detach()]))
            loss = total * world.size / sums[1].clamp_min(1e-12)
            logged = sums[0] / sums[1].clamp_min(1e-12)
        else:
            loss = total / count.clamp_min(1e-12)
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


def _config_dict(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["caches"] = [str(p) for p in cfg.caches]
    d["out"] = str(cfg.out)
    d["val_cache"] = str(cfg.val_cache) if cfg.val_cache else None
    return d


def train(cfg: TrainConfig) -> TrainResult:
    """Train a head on cached features; see the module docstring. Under torchrun the ranks
    train one DDP model: each computes its slice of every global batch, metrics are reduced
    over ranks, and only rank 0 writes checkpoints and stats."""
    started = time.perf_counter()
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise ConfigError("epochs and batch size must be >= 1 and the learning rate > 0")
    caches, val = open_train_caches(cfg)
    check_output_dir(cfg)
    device = resolve_device(cfg.device)
    with distributed.launched(device) as world:
        if world.enabled and cfg.batch_size < world.size:
            raise ConfigError(f"batch size {cfg.batch_size} is smaller than {world.size} ranks")
        result = _train(cfg, caches, val, world, world.device(device))
    result.seconds = time.perf_counter() - started
    return result


def _train(cfg: TrainConfig, caches, val, world: World, device: torch.device) -> TrainResult:
    spec = caches[0].spec
    class_map = spec.class_map
    class_pixels = sum(c.class_pixels() for c in caches)
    weights_np = parse_class_weights(cfg.class_weights, class_pixels)
    weight = None
    if weights_np is not None:
        weight = torch.tensor(weights_np, dtype=torch.float32, device=device)

    head_cfg = HeadConfig(
        name=cfg.head,
        in_channels=spec.backbone.channels,
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
    source = choose_source(
        caches, device, cfg.memory_budget_gb, cfg.stream, cfg.shuffle_window, cfg.progress, world
    )
    steps_per_epoch = len(rank_slices(source.num_images, cfg.batch_size, world))
    total_steps = cfg.epochs * steps_per_epoch
    warmup = warmup_steps(cfg.warmup_epochs, steps_per_epoch, total_steps)
    val_features = None
    if val is not None:
        val_features = view0_features(val)
        if source.kind == "memory":  # the training set fits, so the smaller val set does too
            val_features = (val_features[0].to(device), val_features[1].to(device))

    base_payload = head_payload(
        head_cfg,
        class_map,
        spec.backbone,
        spec.preprocessing,
        train_config=_config_dict(cfg),
        train_caches=[c.spec.fingerprint for c in caches],
        val_cache=val.spec.fingerprint if val else None,
        class_weights=weights_np.tolist() if weights_np is not None else None,
        world_size=world.size,
    )

    history: list[dict] = []
    step_losses: list[float] = []
    best: dict | None = None
    start_epoch = 1
    if cfg.resume:
        last = load_checkpoint(cfg.out / LAST_FILE).payload
        if (
            last["train_caches"] != base_payload["train_caches"]
            or last["val_cache"] != base_payload["val_cache"]
        ):
            raise CacheError(
                f"{cfg.out / LAST_FILE}: was trained on different caches; cannot resume"
            )
        if last["head_config"] != base_payload["head_config"]:
            raise ConfigError(f"{cfg.out / LAST_FILE}: was trained with a different head config")
        head.load_state_dict(last["state_dict"])
        optimizer.load_state_dict(last["optimizer"])
        if last.get("scaler"):  # fp16 runs (a disabled scaler saves nothing)
            scaler.load_state_dict(last["scaler"])
        _set_rng_state(_rng_for_rank(last["rng"], world), device)
        history, best = last["history"], last["best"]
        start_epoch = last["epoch"] + 1
        if world.is_main:
            log.info("resuming %s at epoch %d", cfg.out, start_epoch)
    if world.is_main:
        cfg.out.mkdir(parents=True, exist_ok=True)

    saved_epoch = start_epoch - 1
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            epoch_losses, lr = train_one_epoch(
                model,
                optimizer,
                source,
                cfg,
                epoch,
                steps_per_epoch,
                warmup,
                weight,
                device,
                world,
                scaler,
            )
            step_losses += epoch_losses
            row: dict = {"epoch": epoch, "train_loss": sum(epoch_losses) / len(epoch_losses)}
            metrics = None
            if val is not None:
                metrics = evaluate_on_cache(
                    head, val, device, weight, features=val_features, world=world
                )
                row.update(
                    val_loss=metrics.loss,
                    val_miou=metrics.miou,
                    val_dice=metrics.mean_dice,
                    val_pixel_acc=metrics.pixel_accuracy,
                )
            row["lr"] = lr
            row["seconds"] = time.perf_counter() - t0
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
                    cfg.out / STATS_DIR / "history.json", {"history": history, "best": best}
                )
            saved_epoch = epoch
            world.barrier()
    except KeyboardInterrupt:
        if saved_epoch == 0:
            raise Interrupted("interrupted before the first epoch ended; nothing saved") from None
        raise Interrupted(
            f"interrupted: {cfg.out / LAST_FILE} holds epoch {saved_epoch} of {cfg.epochs}; "
            "rerun the same command with --resume to continue"
        ) from None

    if world.is_main:
        final = None
        if val is not None:  # the best epoch's validation, saved with its head (maybe by an
            # earlier run that this one resumed): no second pass over the val cache
            final = SegMetrics.from_dict(
                load_checkpoint(cfg.out / HEAD_FILE).payload["val_metrics"]
            )
        write_stats(cfg.out, history, best, final)
    world.barrier()
    return TrainResult(cfg.out, history, best, 0.0, source.kind, step_losses)


def _epoch_line(row: dict, epochs: int) -> str:
    text = f"epoch {row['epoch']:>3}/{epochs}  train_loss {row['train_loss']:.4f}"
    if row.get("val_miou") is not None:
        text += (
            f"  val_loss {row['val_loss']:.4f}  val_mIoU {row['val_miou']:.4f}"
            f"  val_Dice {row['val_dice']:.4f}  val_acc {row['val_pixel_acc']:.4f}"
        )
    return text + f"  ({row['seconds']:.2f} s)"
