"""What a run records about itself: train_stats/config.json (the run record: settings, head,
caches, backbone), and once every epoch is trained the final stats (history.csv,
evaluation_metrics.txt, the plots, and history.json marked finished, last)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from offroad_seg import __version__
from offroad_seg.config import TrainConfig
from offroad_seg.core.atomic import write_json_atomic, write_text_atomic
from offroad_seg.core.distributed import World
from offroad_seg.errors import OffroadSegError
from offroad_seg.metrics.confusion import SegMetrics
from offroad_seg.metrics.hackathon import HackathonMetrics
from offroad_seg.models.checkpoint import DIGEST_KEY, load_checkpoint, save_checkpoint
from offroad_seg.models.heads import HeadConfig
from offroad_seg.training.run_folder import (
    CONFIG_FILE,
    FINISHED,
    HEAD_FILE,
    HISTORY_FILE,
    STATS_DIR,
    config_dict,
)


def run_record(
    cfg: TrainConfig,
    head_cfg: HeadConfig,
    spec,
    train_fps: list[str],
    val_fp: str | None,
    weights_np,
    world: World,
    train_sizes: list[list[int]] | None = None,
) -> dict:
    """train_stats/config.json: everything the run was (settings with the preset and resume
    applied, the head as built, caches and their fingerprints, backbone, preprocessing: the
    working size inference uses; `train_sizes`: every training cache's size)."""
    return {
        "tool_version": __version__,
        "settings": config_dict(cfg),
        "head": head_cfg.to_dict(),
        "backbone": spec.backbone.to_dict(),
        "preprocessing": spec.preprocessing.to_dict(),
        "train_sizes": train_sizes or [list(spec.preprocessing.size)],
        "class_map": spec.class_map.names,
        "train_caches": [
            {"path": str(p), "fingerprint": fp} for p, fp in zip(cfg.caches, train_fps, strict=True)
        ],
        "val_cache": {"path": str(cfg.val_cache), "fingerprint": val_fp} if val_fp else None,
        "class_weights": weights_np.tolist() if weights_np is not None else None,
        "world_size": world.size,
    }


def write_run_record(out: Path, run: dict) -> None:
    """train_stats/config.json, the first thing a run writes."""
    (out / STATS_DIR).mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / STATS_DIR / CONFIG_FILE, run)


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
        f"size: {'x'.join(str(v) for v in run['preprocessing']['size'])}" + _trained_at(run),
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


def _trained_at(run: dict) -> str:
    """' (trained at 210x378, 266x476)' for a run trained on caches of several sizes."""
    sizes = run.get("train_sizes") or []
    if len(sizes) < 2:
        return ""
    return f" (trained at {', '.join('x'.join(str(v) for v in s) for s in sizes)})"


def write_final_stats(
    out: Path, history: list[dict], best: dict | None, run: dict, with_val: bool, last: dict | None
) -> None:
    """The stats of a run whose epochs are all trained. `last`: a trained run's last.pth, when
    this session only writes its missing outputs (the head among them is rebuilt from it)."""
    final = None
    if last is not None and not (out / HEAD_FILE).is_file():
        rebuild_head(out, last, with_val=with_val)
    if with_val:  # the best epoch's validation, saved with its head (maybe by an earlier run
        # that this one resumed): no second pass over the val cache
        saved = load_checkpoint(out / HEAD_FILE).payload
        final = SegMetrics.from_dict(saved["val_metrics"])
        if "val_hackathon" in saved:
            run = {**run, "val_hackathon": saved["val_hackathon"]}
    write_stats(out, history, best, final, run)


def rebuild_head(out: Path, last: dict, with_val: bool) -> None:
    """segmentation_head.pth of a trained run, from its last.pth when that is the same head
    (no validation: the head is the last epoch's); with validation the best epoch's weights
    are gone with the file."""
    if with_val:
        raise OffroadSegError(
            f"{out / HEAD_FILE}: missing, and the best epoch's head cannot be rebuilt without "
            "training; use --overwrite to train again"
        )
    resume_only = ("history", "optimizer", "rng", "scaler", "stopped_early", "trained_state_dict",
                   DIGEST_KEY)  # fmt: skip
    save_checkpoint(out / HEAD_FILE, {k: v for k, v in last.items() if k not in resume_only})


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
        lines += ["", *saved_epoch_lines(best)]
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


def saved_epoch_lines(best: dict) -> list[str]:
    """The saved head's epoch (the best val mIoU) and its validation metrics, all of that one
    epoch: another epoch's higher Dice or lower loss belongs to a head that was not kept."""
    return [
        f"Saved head ({HEAD_FILE}): epoch {best['epoch']}, the best val mIoU",
        f"  val mIoU: {best['val_miou']:.4f}",
        f"  val Dice: {best['val_dice']:.4f}",
        f"  val pixel accuracy: {best['val_pixel_acc']:.4f}",
        f"  val loss: {best['val_loss']:.4f}",
    ]


def history_csv(history: list[dict]) -> str:
    """Rows of dicts as CSV, the union of their keys as columns (None: empty)."""
    keys = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in keys})
    return buf.getvalue()


def run_name(out: Path) -> str:
    """How plots name a run: its folder, with the parent for context (runs/h1)."""
    out = Path(out).resolve()
    return f"{out.parent.name}/{out.name}" if out.parent.name else out.name
