"""The `offroad-seg` command line: thin wrappers that turn options into one stage call.

Errors caused by input (`OffroadSegError`) end with one line on stderr and exit status 1;
Ctrl-C exits 130 after the stage has left its outputs resumable.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import click
from tqdm.auto import tqdm

from offroad_seg import __version__
from offroad_seg.config import (
    ENGINES,
    PRESETS,
    DemoConfig,
    EvalConfig,
    ExportConfig,
    ExtractConfig,
    PredictConfig,
    SweepConfig,
    TrainConfig,
    default,
)
from offroad_seg.data.synthetic import SynthConfig
from offroad_seg.errors import Interrupted, OffroadSegError

log = logging.getLogger("offroad_seg")


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def _is_main_rank() -> bool:
    """False on the non-zero ranks of a torchrun launch: they work quietly."""
    return int(os.environ.get("RANK", "0")) == 0


def _setup_logging(verbose: int, quiet: bool) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("offroad_seg")
    root.handlers[:] = [handler]
    root.propagate = False
    _set_level(logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO))


def _set_level(level: int) -> None:
    if not _is_main_rank():
        level = max(level, logging.WARNING)
    logging.getLogger("offroad_seg").setLevel(level)


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def stage(fn):
    """Run a command body, turning user-facing errors into one line and an exit status."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OffroadSegError as e:
            code = 130 if isinstance(e, Interrupted) else 1
            _fail(str(e).splitlines()[0] if str(e) else type(e).__name__, code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except OSError as e:
            # Disk full, permission denied, ...: name the file when the OS does.
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            _fail(f"{where}{e.strerror or e}")

    return wrapper


class LazyChoice(click.Choice):
    """A choice whose values come from a registry loaded on first use (the head registry
    imports torch, which `offroad-seg --help` should not pay for)."""

    def __init__(self, load) -> None:
        self._load = load
        self.case_sensitive = True

    @property
    def choices(self):
        return tuple(self._load())


class LossSpecType(click.ParamType):
    """A loss spec such as ce+0.5dice, checked against the loss registry when given."""

    name = "SPEC"

    def convert(self, value, param, ctx):
        from offroad_seg.errors import ConfigError
        from offroad_seg.training.losses import LossSpec

        try:
            return str(LossSpec.parse(str(value)))
        except ConfigError as e:
            self.fail(str(e), param, ctx)


class ScalesType(click.ParamType):
    """Comma-separated positive numbers: 0.75,1,1.25."""

    name = "S1,S2,..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            scales = tuple(float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r}: expected comma-separated numbers, e.g. 0.75,1,1.25", param, ctx)
        if not all(s > 0 for s in scales):
            self.fail(f"{value!r}: scales must be positive", param, ctx)
        return scales


def _head_choices():
    from offroad_seg.models.heads import head_choices

    return head_choices()


def _work_line(verb: str, result, out: Path) -> str:
    """'evaluated 8 images in 3.1 s (2.58 images/s); results in OUT', or what was already
    done when a rerun had nothing left to compute."""
    from offroad_seg.core.text import plural

    parts = []
    if result.images:
        parts.append(plural(result.images, "image"))
    if getattr(result, "videos", 0):
        parts.append(f"{plural(result.videos, 'video')} ({plural(result.frames, 'frame')})")
    what = " and ".join(parts) or "nothing"
    if result.computed == 0 and not getattr(result, "frames", 0):
        return f"all {what} were already {verb}; results in {out}"
    speed = f" ({result.images_per_s:.2f} images/s)" if result.computed else ""
    return f"{verb} {what} in {result.seconds:.1f} s{speed}; results in {out}"


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


WEIGHTS_HELP = (
    "Backbone weights: the official .pth (e.g. dinov2_vits14_pretrain.pth, "
    "dinov3_vits16_pretrain_lvd1689m-08c60483.pth) or a timm or "
    "transformers .safetensors of the --backbone variant, 'auto' ($OFFROAD_SEG_WEIGHTS, torch "
    "hub cache, Hugging Face cache, then download), or 'random' for an untrained backbone "
    "(tests and smoke runs only)."
)


def _backbone_names() -> list[str]:
    from offroad_seg.models.variants import BACKBONES

    return list(BACKBONES)


def head_inference_options(fn):
    """The options evaluate and predict share: how a trained head's pipeline runs."""
    options = (
        click.option(
            "--weights",
            default=None,
            help="Backbone weights [default: those the head was trained on].",
        ),
        click.option(
            "--batch-size", type=int, default=None, help="Images per pass [default: 8 CPU, 64 GPU]."
        ),
        click.option(
            "--workers", type=int, default=None, help="Decoding workers [default: by device]."
        ),
        click.option("--device", default=default(EvalConfig, "device"), show_default=True),
        click.option(
            "--tta",
            type=click.Choice(["none", "flip"]),
            default=default(EvalConfig, "tta"),
            show_default=True,
            help="flip: average in the logits of each image's mirror (at every scale).",
        ),
        click.option(
            "--tta-scales",
            type=ScalesType(),
            default=",".join(f"{s:g}" for s in default(EvalConfig, "tta_scales")),
            show_default=True,
            help="Working-size scales whose logits are averaged at each image's size, e.g. "
            "0.75,1,1.25 (sizes rounded to multiples of the backbone's patch, 14 or 16; a pass "
            "costs ~scale^2 or more).",
        ),
        click.option(
            "--engine",
            type=click.Choice(ENGINES),
            default=None,
            help="torch, or onnxruntime (needs offroad-seg[export]; a .pth head is exported to "
            "ONNX first) [default: torch for a .pth head, onnxruntime for an exported .onnx].",
        ),
    )
    for option in reversed(options):  # click applies decorators bottom-up
        fn = option(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="offroad-seg")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose: int, quiet: bool) -> None:
    """Off-road scene segmentation on a frozen DINOv2 backbone.

    \b
    Typical use:
      offroad-seg extract data/train cache/train.zarr      # backbone once, features cached
      offroad-seg extract data/val cache/val.zarr
      offroad-seg train cache/train.zarr runs/h1 --val-cache cache/val.zarr
      offroad-seg evaluate runs/h1/segmentation_head.pth data/val runs/h1/val
    """
    _setup_logging(verbose, quiet)


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--train",
    "n_train",
    default=default(SynthConfig, "train"),
    show_default=True,
    help="Training images.",
)
@click.option(
    "--val",
    "n_val",
    default=default(SynthConfig, "val"),
    show_default=True,
    help="Validation images.",
)
@click.option(
    "--seed",
    default=default(SynthConfig, "seed"),
    show_default=True,
    help="Random seed (same seed, same data).",
)
@click.option(
    "--width",
    default=default(SynthConfig, "width"),
    show_default=True,
    help="Image width in pixels.",
)
@click.option(
    "--height",
    default=default(SynthConfig, "height"),
    show_default=True,
    help="Image height in pixels.",
)
@stage
def synth(out: Path, n_train: int, n_val: int, seed: int, width: int, height: int) -> None:
    """Write synthetic off-road scenes in the real dataset's format to OUT/train and OUT/val.

    Each split holds Color_Images/*.png (RGB) and Segmentation/*.png (16-bit raw class codes).
    """
    from offroad_seg.data.synthetic import synthesize

    names = synthesize(SynthConfig(out, n_train, n_val, seed, width, height))
    click.echo(f"wrote {len(names['train'])} train and {len(names['val'])} val scenes to {out}")


@cli.command()
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.argument("cache")
@click.option(
    "--backbone",
    type=click.Choice(_backbone_names()),
    default=default(ExtractConfig, "backbone"),
    show_default=True,
    help="DINOv2 or DINOv3 variant (`offroad-seg backbones` lists them; DINOv3 weights are "
    "under Meta's DINOv3 License, see docs/backbones.md).",
)
@click.option(
    "--weights", default=default(ExtractConfig, "weights"), show_default=True, help=WEIGHTS_HELP
)
@click.option(
    "--size",
    default=None,
    help="Working size ROWSxCOLS, multiples of the backbone's patch: 14 for DINOv2 (960x540 "
    "images allow up to 532x952), 16 for DINOv3 [default: 266x476 for DINOv2, 272x480 for "
    "DINOv3].",
)
@click.option(
    "--layers",
    type=click.Choice(["1", "4"]),
    default=str(default(ExtractConfig, "layers")),
    show_default=True,
    help="1: final-norm patch tokens (width channels, 384 for ViT-S); 4: the last four blocks, "
    "each normed, concatenated (4 x width).",
)
@click.option(
    "--views",
    type=click.Choice(["none", "flip"]),
    default="none",
    show_default=True,
    help="flip: also cache the horizontally flipped image (view 1) with flipped labels.",
)
@click.option(
    "--device",
    default=default(ExtractConfig, "device"),
    show_default=True,
    help="auto, cpu, cuda, cuda:1, ...",
)
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help="Images per backbone pass [default: 8 CPU, 64 GPU].",
)
@click.option("--workers", type=int, default=None, help="Decoding workers [default: by device].")
@click.option(
    "--dtype",
    type=click.Choice(["float16", "float32", "int8"]),
    default=default(ExtractConfig, "dtype"),
    show_default=True,
    help="Stored feature precision; int8 (a scale per token and layer) halves the cache.",
)
@click.option(
    "--images-per-chunk",
    default=default(ExtractConfig, "images_per_chunk"),
    help="Images per chunk [default: ~1 MiB chunks].",
)
@click.option(
    "--class-map",
    help="'default' (the 11 off-road classes), 'hackathon' (the hackathon's 10: Flowers and "
    "unknown codes are Background), or a JSON list of {code, name, color}.",
)
@click.option("--ignore-unknown-codes", is_flag=True, help="Treat unknown mask codes as ignore.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache instead of resuming.")
@stage
def extract(data_dir: Path, cache: str, **opts) -> None:
    """Run the backbone once over DATA_DIR and cache patch features in CACHE (a zarr group:
    a folder, or a URL such as s3://bucket/train.zarr).

    Rerunning the same command resumes an interrupted extraction. Under torchrun
    (`torchrun --nproc-per-node K -m offroad_seg extract ...`) the ranks share the work.
    """
    from offroad_seg.features.extract import extract
    from offroad_seg.models.preprocess import parse_size

    views = ("identity", "hflip") if opts.pop("views") == "flip" else ("identity",)
    summary = extract(
        ExtractConfig(
            data_dir=data_dir,
            cache=cache,
            layers=int(opts.pop("layers")),
            views=views,
            size=parse_size(size) if (size := opts.pop("size")) else None,
            **opts,
        )
    )
    if _is_main_rank():
        click.echo(summary.line())


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
        help="linear (DINOv2's linear protocol), seed (the hackathon's head; alias baseline), "
        "convnext, pyramid (UPerNet-style, logits at 4x the token grid).",
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
@click.argument("caches", nargs=-1, required=True)
@click.argument("out", type=click.Path(path_type=Path))
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
    if not _is_main_rank():
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
@click.argument("caches", nargs=-1, required=True)
@click.argument("out", type=click.Path(path_type=Path))
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
    from offroad_seg.training.sweep import sweep

    search = {k: opts.pop(k) for k in ("grid", "ranges", "choices", "trials", "prune",
                                        "storage", "sampler_seed", "overwrite")}  # fmt: skip
    base = TrainConfig(caches=caches, out=out, **opts)
    result = sweep(SweepConfig(train=base, **search))
    if not _is_main_rank():
        return
    from offroad_seg.core.text import plural

    click.echo((out / "leaderboard.md").read_text() if result.rows else "no finished trials")
    line = f"{plural(result.trained, 'trial')} trained by this process in {result.seconds:.1f} s"
    best = result.rows[0] if result.rows and result.rows[0]["state"] == "complete" else None
    if best is not None:  # failed and pruned trials are never the best
        line += f"; best val mIoU {best['val_miou']:.4f}: {out / 'best'} -> {best['run']}"
    click.echo(line)
    for failure in result.failed:
        click.echo(f"failed: {failure}", err=True)


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--markdown", is_flag=True, help="A markdown table.")
@click.option(
    "--plot",
    type=click.Path(path_type=Path),
    help="Also write a PNG of the runs' per-class IoU.",
)
@stage
def compare(runs: tuple[Path, ...], markdown: bool, plot: Path | None) -> None:
    """Compare runs (folders or head checkpoints): the settings that differ, and their
    validation metrics and per-class IoU side by side."""
    from offroad_seg.reporting.compare import comparison_table, summarize

    summaries = [summarize(r) for r in runs]
    click.echo(comparison_table(summaries, markdown=markdown))
    if plot is not None:
        from offroad_seg.reporting.plots import plot_class_iou_comparison

        plot_class_iou_comparison(
            {s.name: s.class_iou for s in summaries}, plot, title="Per-class IoU (validation)"
        )
        click.echo(f"plot: {plot}")


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@stage
def info(path: Path, as_json: bool) -> None:
    """What a head checkpoint (or run folder) is: backbone, head, settings, best metrics."""
    from offroad_seg.reporting.info import head_info, head_info_text

    summary = head_info(path)
    click.echo(json.dumps(summary, indent=2) if as_json else head_info_text(summary))


@cli.command()
@click.argument("head", type=click.Path(path_type=Path))
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@head_inference_options
@click.option(
    "--comparisons",
    default=default(EvalConfig, "comparisons"),
    show_default=True,
    help="Comparison panels (image | truth | prediction) for the first N images; 0 for none.",
)
@click.option("--no-masks", "write_masks", flag_value=False, default=True, help="Metrics only.")
@click.option(
    "--class-map",
    help="The class map the data uses (a built-in name or a JSON file); refused if it differs "
    "from the head's.",
)
@click.option("--ignore-unknown-codes", is_flag=True, help="Treat unknown mask codes as ignore.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace everything offroad-seg wrote in OUT (rerunning the same command resumes).",
)
@stage
def evaluate(head: Path, data_dir: Path, out: Path, **opts) -> None:
    """Evaluate HEAD (a .pth head, or an .onnx from `export`) on a labelled dataset DATA_DIR,
    end to end from the images.

    Writes OUT/masks (raw class codes, 16-bit), masks_color, comparisons, thumbnails,
    report.html, evaluation_metrics.txt, per_class_metrics.png, confusion_matrix.png and,
    last, metrics.json. Rerunning the same command after an interruption resumes; under
    torchrun the ranks share the images.
    """
    from offroad_seg.inference.evaluate import evaluate

    result = evaluate(EvalConfig(head=head, data_dir=data_dir, out=out, **opts))
    if not _is_main_rank():
        return
    click.echo(result.metrics.table(f"Evaluation of {head} on {data_dir}"))
    click.echo("")
    click.echo(result.hackathon.table())
    click.echo("\n" + _work_line("evaluated", result, out))


@cli.command()
@click.argument("head", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@head_inference_options
@click.option(
    "--no-overlays", "overlays", flag_value=False, default=True, help="Masks only (no overlays)."
)
@click.option(
    "--frame-stride",
    default=default(PredictConfig, "frame_stride"),
    show_default=True,
    help="Videos: predict every N-th frame.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace everything offroad-seg wrote in OUT (rerunning the same command resumes).",
)
@stage
def predict(head: Path, inputs: tuple[Path, ...], out: Path, **opts) -> None:
    """Segment INPUTS with HEAD (a .pth head, or an .onnx from `export`); results go to OUT.
    INPUTS are PNG or JPEG files, folders (a dataset folder's Color_Images), globs
    ('frames/*.jpg') and videos (.mp4, .mov, ...).

    Writes OUT/masks (raw class codes, 16-bit), masks_color, overlays (with a legend; an .mp4
    per video) and, last, predictions.json. Rerunning the same command resumes.
    """
    from offroad_seg.inference.predict import predict

    result = predict(PredictConfig(head=head, inputs=inputs, out=out, **opts))
    if _is_main_rank():
        click.echo(_work_line("predicted", result, out))


def _parse_batch(text: str) -> int | None:
    if text == "dynamic":
        return None
    if not text.isdigit() or int(text) < 1:
        raise click.BadParameter(f"{text!r}: expected a positive number or 'dynamic'")
    return int(text)


@cli.command()
@click.argument("head", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--size",
    default=None,
    help="Input size ROWSxCOLS, multiples of the backbone's patch (14 DINOv2, 16 DINOv3) "
    "[default: the head's working size].",
)
@click.option(
    "--batch",
    default=str(default(ExportConfig, "batch")),
    show_default=True,
    help="Images per call: a number, or 'dynamic' for any (TensorRT is fastest with a fixed "
    "batch).",
)
@click.option("--argmax", is_flag=True, help="Also output uint8 class ids at the input size.")
@click.option(
    "--quantize",
    type=click.Choice(["none", "dynamic"]),
    default=default(ExportConfig, "quantize"),
    show_default=True,
    help="dynamic: int8 weights of the transformer's matrix products, activations quantised "
    "per call (ONNX Runtime on CPU; check its masks against float32 before relying on it).",
)
@click.option(
    "--weights", default=None, help="Backbone weights [default: those the head was trained on]."
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@stage
def export(head: Path, out: Path, size: str | None, batch: str, **opts) -> None:
    """Export HEAD (.pth) with its backbone as one ONNX graph OUT (.onnx): uint8 RGB images
    (B, 3, rows, cols), resized as the tool resizes them, in; class logits at the input size
    and on the head's grid (and class ids with --argmax) out. The class map, preprocessing,
    backbone and head are in the model's metadata. Needs offroad-seg[export].
    """
    from offroad_seg.inference.export import export
    from offroad_seg.models.preprocess import parse_size

    cfg = ExportConfig(
        head=head,
        out=out,
        size=parse_size(size) if size else None,
        batch=_parse_batch(batch),
        **opts,
    )
    click.echo(export(cfg).line())


@cli.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=default(DemoConfig, "out"),
    show_default=True,
    help="Folder for everything the demo writes (replaced on each run).",
)
@click.option(
    "--train",
    "n_train",
    default=default(DemoConfig, "train"),
    show_default=True,
    help="Training scenes.",
)
@click.option(
    "--val",
    "n_val",
    default=default(DemoConfig, "val"),
    show_default=True,
    help="Validation scenes.",
)
@click.option("--epochs", default=default(DemoConfig, "epochs"), show_default=True)
@click.option(
    "--width", default=default(DemoConfig, "width"), show_default=True, help="Scene width."
)
@click.option(
    "--height", default=default(DemoConfig, "height"), show_default=True, help="Scene height."
)
@click.option(
    "--size",
    default=_size_text(default(DemoConfig, "size")),
    show_default=True,
    help="Working size ROWSxCOLS.",
)
@click.option(
    "--weights",
    default=None,
    help="Backbone weights [default: real weights if found offline, else an untrained backbone].",
)
@stage
def demo(out: Path, n_train: int, n_val: int, epochs: int, width: int, height: int, size, weights):
    """Synthetic scenes -> extract -> train -> evaluate, in one go."""
    from offroad_seg.demo import demo
    from offroad_seg.models.preprocess import parse_size

    size = parse_size(size)
    cfg = DemoConfig(
        out=out,
        train=n_train,
        val=n_val,
        width=width,
        height=height,
        size=size,
        epochs=epochs,
        weights=weights,
    )
    result = demo(cfg, say=lambda line: click.echo(line, err=True))
    ev = result.evaluation
    click.echo("")
    click.echo(ev.metrics.table("Demo: evaluation on the synthetic validation split"))
    if result.weights == "random":
        click.echo("\n(untrained backbone: these numbers show the pipeline works, nothing more)")
    click.echo(f"\nfinished in {result.seconds:.1f} s; written:")
    written = [
        ("data", str(out / "data")),
        ("caches", f"{out / 'cache' / 'train.zarr'}, {out / 'cache' / 'val.zarr'}"),
        ("head", str(out / "head" / "segmentation_head.pth")),
        ("train stats", str(out / "head" / "train_stats")),
        *((p.name, str(p)) for p in ev.files),
    ]
    width = max(len(label) for label, _ in written)
    for label, path in written:
        click.echo(f"  {label:<{width}}  {path}")


@cli.command("backbones")
@stage
def backbones() -> None:
    """List the DINOv2 and DINOv3 variants extract can use, with their weight files."""
    from offroad_seg.models.variants import BACKBONES

    click.echo(
        f"{'name':<20} {'family':<6} {'patch':>5} {'size':>7} {'params':>8} {'width':>5} "
        f"{'blocks':>6} {'registers':>9}  weights"
    )
    for v in BACKBONES.values():
        click.echo(
            f"{v.name:<20} {v.family:<6} {v.patch_size:>5} {_size_text(v.default_size):>7} "
            f"{v.params_m:>7.0f}M {v.embed_dim:>5} {v.depth:>6} {v.registers:>9}  "
            f"{v.official_file}, {v.timm_repo}, {v.transformers_repo}"
        )
    click.echo(
        "DINOv3 weights are under Meta's DINOv3 License, not Apache-2.0; its terms are yours to "
        "accept with the weights (docs/backbones.md)."
    )


@cli.group("cache")
def cache_group() -> None:
    """Inspect and check feature caches."""


@cache_group.command("info")
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@stage
def cache_info(cache: str, as_json: bool) -> None:
    """Show what a cache holds: images, views, shapes, size on disk, backbone, preprocessing."""
    from offroad_seg.features.cache import FeatureCache

    info = FeatureCache.open(cache).info()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    f = info["features"]
    bb = info["backbone"]
    size = info["preprocessing"]["size"]
    grid = info["preprocessing"]["grid"]
    per_image = info["bytes_per_image"]
    lines = [
        f"cache        {info['path']}",
        f"status       {'complete' if info['complete'] else 'UNFINISHED'}"
        f" ({info['done']}/{info['images']} images)",
        f"views        {', '.join(info['views'])}",
        f"features     {tuple(f['shape'])} {f['dtype']}, chunks {tuple(f['chunks'])}",
        f"labels       {tuple(info['labels']['shape'])} uint8 (255 = ignore)",
        f"size         {size[0]}x{size[1]} -> {grid[0]}x{grid[1]} tokens",
        f"backbone     {bb['name']} layers={bb['layers']} channels={bb['channels']}",
        f"weights      {bb['weights_source']} (sha256 {bb['weights_sha256'][:16]}...)",
        f"on disk      {info['bytes_on_disk'] / 1e6:.2f} MB"
        + (f", {per_image / 1e3:.0f} kB/image" if per_image else "")
        + (f", compression {info['compression_ratio']:.2f}x" if info["compression_ratio"] else ""),
        f"classes      {', '.join(info['classes'])}",
        f"fingerprint  {info['fingerprint'][:16]}",
    ]
    click.echo("\n".join(lines))


@cache_group.command("verify")
@click.argument("cache")
@stage
def cache_verify(cache: str) -> None:
    """Read every chunk: checksums, missing chunks, done flags, fingerprint, histogram."""
    from offroad_seg.core.text import plural
    from offroad_seg.features.cache import FeatureCache

    report = FeatureCache.open(cache).verify(progress=True)
    if report.ok:
        click.echo(f"ok: {cache}: {plural(report.chunks_checked, 'chunk')} verified")
        return
    for problem in report.problems:
        click.echo(f"{cache}: {problem}", err=True)
    if report.problems:
        _fail(f"{cache}: {plural(len(report.problems), 'problem')} found")
    done = report.images - report.unfinished
    state = (
        f"unfinished ({done} of {plural(report.images, 'image')} extracted)"
        if report.unfinished
        else "every image extracted, but not finalized"
    )
    _fail(
        f"{cache}: {state}; rerun the same `offroad-seg extract` command to resume "
        "(what is there verified ok)"
    )


def _accept_verbosity_everywhere(group: click.Group) -> None:
    """-v/-q are accepted after the command too (`offroad-seg evaluate ... -q`), not only
    before it."""

    def verbose(ctx, param, value):
        if value:
            _set_level(logging.DEBUG)

    def quiet(ctx, param, value):
        if value:
            _set_level(logging.WARNING)

    for command in group.commands.values():
        if isinstance(command, click.Group):
            _accept_verbosity_everywhere(command)
            continue
        command.params += [
            click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=verbose,
                         help="More log output."),
            click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=quiet,
                         help="Only warnings and errors."),
        ]  # fmt: skip


_accept_verbosity_everywhere(cli)


def main() -> None:
    cli(prog_name="offroad-seg")


if __name__ == "__main__":
    main()
