"""Commands that train heads: `train` and `sweep`, and the run-setting options both take."""

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
from offroad_seg.config import PRESETS, SweepConfig, TrainConfig, default


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
    click.option("--device", default=default(TrainConfig, "device"), show_default=True),
    click.option(
        "--memory-budget-gb",
        type=float,
        default=None,
        help="Load features into RAM/GPU up to this size, else stream [default: half of free].",
    ),
    click.option("--stream", is_flag=True, help="Always stream features from the cache."),
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
    if result.epochs_trained == 0 and result.completed:
        written = ", ".join(result.completed)
        line = f"{out}: all {epochs} epochs were already trained; wrote the missing {written}"
    elif result.epochs_trained == 0:
        line = f"{out}: all {epochs} epochs were already trained; nothing to do"
    else:
        first = epochs - result.epochs_trained + 1
        span = f"epochs {first}-{epochs}" if first > 1 else plural(epochs, "epoch")
        line = f"trained {span} in {result.seconds:.1f} s ({result.source})"
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
    "postgresql://...) [default: sqlite in OUT].",
)
@click.option("--sampler-seed", default=default(SweepConfig, "sampler_seed"), show_default=True)
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
                                        "storage", "sampler_seed", "overwrite")}  # fmt: skip
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
    for failure in result.failed:
        click.echo(f"failed: {failure}", err=True)
