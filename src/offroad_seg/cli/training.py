"""Commands that train heads: `train` and `sweep`, and the run-setting options both take; and
`ensemble`, which bundles trained heads into one."""

from __future__ import annotations

from pathlib import Path

import click

from offroad_seg.cli._common import (
    LazyChoice,
    LossSpecType,
    cli,
    is_main_rank,
    paths_then_out,
    stage,
)
from offroad_seg.config import PRESETS, TUNE_MODES, SweepConfig, TrainConfig, default


def _head_choices():
    from offroad_seg.models.heads import head_choices

    return head_choices()


def run_setting_options(fn):
    """The options of a training run's settings, shared by train and sweep (defaults from
    TrainConfig)."""
    for option in reversed(_RUN_SETTING_OPTIONS):  # click applies decorators bottom-up
        fn = option(fn)
    return fn


_RUN_SETTING_OPTIONS = [
    click.option(
        "--head",
        type=LazyChoice(_head_choices),
        default=default(TrainConfig, "head"),
        show_default=True,
        help="Which head, and when to choose it:\n\n\b\n"
        "linear    a linear probe: are the features enough?\n"
        "seed      the hackathon's head (baseline): reproduce it\n"
        "convnext  token-grid logits, cheap: quick CPU sweeps\n"
        "upnext    convnext + x4 upsampler: CPU or GPU (default)\n"
        "pyramid   UPerNet, 35x the cost: GPU, large inputs",
    ),
    click.option(
        "--width", default=default(TrainConfig, "width"), help="Head width [default: the head's]."
    ),
    click.option(
        "--depth", default=default(TrainConfig, "depth"), help="Head blocks [default: the head's]."
    ),
    click.option("--dropout", type=float, default=None, help="[default: the head's]."),
    click.option("--epochs", default=default(TrainConfig, "epochs"), show_default=True),
    click.option("--batch-size", default=default(TrainConfig, "batch_size"), show_default=True),
    click.option(
        "--lr",
        default=default(TrainConfig, "lr"),
        show_default=True,
        help="Peak AdamW learning rate.",
    ),
    click.option("--weight-decay", default=default(TrainConfig, "weight_decay"), show_default=True),
    click.option(
        "--warmup-epochs", default=default(TrainConfig, "warmup_epochs"), show_default=True
    ),
    click.option(
        "--loss",
        type=LossSpecType(),
        default=default(TrainConfig, "loss"),
        show_default=True,
        help="A weighted sum of loss terms, e.g. ce, ce+0.5dice, focal+dice, 0.5ce+0.5lovasz.",
    ),
    click.option(
        "--focal-gamma",
        default=default(TrainConfig, "focal_gamma"),
        show_default=True,
        help="The focal term's gamma.",
    ),
    click.option(
        "--class-weights",
        default=default(TrainConfig, "class_weights"),
        show_default=True,
        help="auto (median-frequency, clipped to [0.1, 10]), none, or K comma-separated numbers.",
    ),
    click.option("--seed", default=default(TrainConfig, "seed"), show_default=True),
    click.option(
        "--patience",
        default=default(TrainConfig, "patience"),
        show_default=True,
        help="Stop once val mIoU has not improved for N epochs (0: off; needs --val-cache).",
    ),
    click.option(
        "--ema",
        default=default(TrainConfig, "ema"),
        show_default=True,
        help="Keep an exponential moving average of the head's weights with this decay, e.g. "
        "0.999 (0: off); validation and the saved head use the average.",
    ),
    click.option("--device", default=default(TrainConfig, "device"), show_default=True),
    click.option(
        "--memory-budget-gb",
        type=float,
        default=None,
        help="Load features into RAM/GPU up to this size, else stream [default: half of free].",
    ),
    click.option("--stream", is_flag=True, help="Always stream features from the cache."),
]

# Tuning the last blocks from a block cache (`extract --block K`; docs/tuning.md)
_RUN_SETTING_OPTIONS += [
    click.option(
        "--tune",
        type=click.Choice(TUNE_MODES),
        default=None,
        help="On a block cache: also train blocks K..N-1 and the final norm, by low-rank "
        "adapters (lora) or all their weights (full) [default: the head alone; on a block "
        "cache it runs the blocks frozen].",
    ),
    click.option(
        "--lora-rank",
        default=default(TrainConfig, "lora_rank"),
        show_default=True,
        help="Rank of the adapters (--tune lora).",
    ),
    click.option(
        "--lora-alpha",
        default=default(TrainConfig, "lora_alpha"),
        show_default=True,
        help="The adapters' update is scaled by alpha / rank.",
    ),
    click.option(
        "--backbone-lr",
        type=float,
        default=None,
        help="Peak learning rate of the tuned blocks and norm [default: --lr for lora, "
        "--lr / 10 for full].",
    ),
    click.option(
        "--checkpointing",
        is_flag=True,
        help="Recompute the tuned blocks' activations in the backward pass (less memory, "
        "~1.3x the time).",
    ),
    click.option(
        "--weights",
        default=None,
        help="Block caches: the backbone weights (a file, auto or random; refused unless "
        "their sha256 is the cache's) [default: the file the cache was extracted from].",
    ),
]


@cli.command()
@paths_then_out("caches")
@click.option("--val-cache", help="Validation cache (folder or URL).")
@click.option(
    "--preset",
    type=click.Choice(list(PRESETS)),
    help="Named settings: 'seed' reproduces the hackathon's training (its head, batch 2, AdamW "
    "3e-4, 20 epochs, weighted cross entropy). Options you give win over the preset's.",
)
@run_setting_options
@click.option(
    "--resume",
    is_flag=True,
    help="Continue OUT/last.pth with the run's own settings (a different one is refused).",
)
@click.option("--overwrite", is_flag=True, help="Replace a head already in OUT.")
@click.option(
    "--tensorboard",
    type=click.Path(path_type=Path),
    help="Log the training curves (loss, val metrics, lr per epoch) to this folder for "
    "TensorBoard (needs the optional tensorboard package).",
)
@stage
def train(caches: tuple[str, ...], out: Path, **opts) -> None:
    """Train a head on one or more CACHES (their features must agree); results go to OUT.
    Caches are folders or URLs (s3://...). Under torchrun the ranks train with DDP.

    Writes OUT/segmentation_head.pth (best by val mIoU, else last), OUT/last.pth and
    OUT/train_stats/ (config.json, history CSV/JSON, curves, evaluation_metrics.txt).
    """
    from offroad_seg.core.text import plural
    from offroad_seg.training.loop import train

    result = train(TrainConfig(caches=caches, out=out, **opts))
    if not is_main_rank():
        return
    epochs = result.config.epochs
    trained = f"all {epochs} epochs were already trained"
    if result.stopped_early:
        trained = f"training already stopped early at epoch {result.history[-1]['epoch']}"
    if result.epochs_trained == 0 and result.completed:
        written = ", ".join(result.completed)
        line = f"{out}: {trained}; wrote the missing {written}"
    elif result.epochs_trained == 0:
        line = f"{out}: {trained}; nothing to do"
    else:
        last = result.history[-1]["epoch"]
        first = last - result.epochs_trained + 1
        span = f"epochs {first}-{last}" if first > 1 else plural(last, "epoch")
        line = f"trained {span} in {result.seconds:.1f} s ({result.source})"
        if result.stopped_early:
            line += f", stopped early (--patience {result.config.patience})"
    if result.best:
        line += f"; best val mIoU {result.best['val_miou']:.4f} at epoch {result.best['epoch']}"
    else:
        line += f"; final train loss {result.history[-1]['train_loss']:.4f}"
    click.echo(line)
    click.echo(f"head: {out / 'segmentation_head.pth'}; stats: {out / 'train_stats'}")


@cli.command()
@paths_then_out("caches")
@click.option("--val-cache", required=True, help="Validation cache: trials are ranked on it.")
@click.option(
    "--grid",
    multiple=True,
    help="NAME=V1,V2,... : every combination of the grids is one trial (e.g. lr=1e-4,3e-4 "
    "--grid head=convnext,pyramid). Values holding commas: separate with ';'.",
)
@click.option(
    "--range",
    "ranges",
    multiple=True,
    help="NAME=LOW:HIGH[:log|int], sampled by Optuna's TPE (e.g. lr=1e-5:1e-2:log).",
)
@click.option(
    "--choice",
    "choices",
    multiple=True,
    help="NAME=V1,V2,... sampled as a category (with --range/--trials).",
)
@click.option("--trials", type=int, help="Sampled searches: the number of trials in all.")
@click.option("--prune", is_flag=True, help="Stop clearly bad trials early (median rule).")
@click.option(
    "--storage",
    help="An Optuna storage URL that processes on several machines share (e.g. "
    "postgresql://user:password@host/db, with offroad-seg[postgres]) [default: sqlite in OUT].",
)
@click.option("--sampler-seed", default=default(SweepConfig, "sampler_seed"), show_default=True)
@click.option(
    "--ensemble-top",
    type=click.IntRange(min=0),
    default=default(SweepConfig, "ensemble_top"),
    help="Also bundle the best K finished trials into OUT/ensemble.pth and report its val "
    "mIoU beside the best trial's (0: none).",
)
@run_setting_options
@click.option("--overwrite", is_flag=True, help="Start the sweep in OUT over.")
@stage
def sweep(caches: tuple[str, ...], out: Path, **opts) -> None:
    """Train many heads on CACHES, one per trial of a grid or sampled search, ranked by
    validation mIoU; results in OUT (trials/, leaderboard.csv/.md/.png, best -> the best run).

    The features load once per process. Rerunning the same command resumes an interrupted
    sweep; starting it again (on another GPU, or under torchrun) adds a process that takes the
    trials nobody has taken.
    """
    from offroad_seg.training.sweep.run import sweep

    search = {k: opts.pop(k) for k in ("grid", "ranges", "choices", "trials", "prune",
                                        "storage", "sampler_seed", "overwrite",
                                        "ensemble_top")}  # fmt: skip
    base = TrainConfig(caches=caches, out=out, **opts)
    result = sweep(SweepConfig(train=base, **search))
    if not is_main_rank():
        return
    from offroad_seg.core.text import plural
    from offroad_seg.training.sweep.leaderboard import top_table

    click.echo(top_table(result.rows, out) if result.rows else "no finished trials")
    line = f"{plural(result.trained, 'trial')} trained by this process in {result.seconds:.1f} s"
    best = result.rows[0] if result.rows and result.rows[0]["state"] == "complete" else None
    if best is not None:  # failed and pruned trials are never the best
        line += f"; best val mIoU {best['val_miou']:.4f}: {out / 'best'} -> {best['run']}"
    click.echo(line)
    if result.ensemble is not None:
        from offroad_seg.training.sweep.leaderboard import ensemble_line

        click.echo(ensemble_line(result.ensemble))
    for failure in result.failed:
        click.echo(f"failed: {failure}", err=True)


@cli.command()
@click.argument("heads", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="The ensemble checkpoint to write (.pth).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@stage
def ensemble(heads: tuple[Path, ...], out: Path, overwrite: bool) -> None:
    """Bundle HEADS (.pth heads, or run folders) trained on the same features (backbone,
    weights, layers, working size, class map) into one checkpoint OUT. At inference the
    backbone runs once and the heads' class probabilities are averaged; evaluate, predict,
    export, info and the Python API take OUT like a head.
    """
    from offroad_seg.core.text import plural
    from offroad_seg.models.checkpoint import resolve_head
    from offroad_seg.models.ensemble import write_ensemble

    ckpt = write_ensemble([resolve_head(h) for h in heads], out, overwrite=overwrite)
    names = ", ".join(c.name for c in ckpt.members)
    rows, cols = ckpt.preprocessing.size
    layout = ckpt.tail_layout()
    shared = ""
    if layout is not None:
        from offroad_seg.models.tuning import is_tuned

        tuned = sum(is_tuned(t) for t in ckpt.member_tunings)
        shared = (
            f"; {tuned} tuned their blocks: the backbone runs once up to block {layout[0]}, "
            f"then {plural(max(layout[1]) + 1, 'branch', 'branches')}"
        )
    click.echo(
        f"wrote {out}: an ensemble of {plural(len(ckpt.members), 'head')} ({names}) on "
        f"{ckpt.backbone.name} at {rows}x{cols}{shared}"
    )
