"""Commands that run a trained head: `evaluate` and `predict` (and the options both take),
and `export` (a head with its backbone as one ONNX graph).
"""

from __future__ import annotations

from pathlib import Path

import click

from offroad_seg.cli._common import ScalesType, cli, is_main_rank, paths_then_out, stage
from offroad_seg.config import ENGINES, EvalConfig, ExportConfig, PredictConfig, default


def _work_line(verb: str, result, out: Path) -> str:
    """'evaluated 8 images in 3.1 s (2.58 images/s); results in OUT', or with videos
    'predicted 3 images and 1 video (30 frames) in 11.7 s (2.82 frames/s); ...' (each image
    counts as one frame of the rate: all were computed in those seconds), or what was already
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
    pictures = result.computed + getattr(result, "frames", 0)  # computed in this session
    unit = "frames" if getattr(result, "frames", 0) else "images"
    speed = f" ({pictures / result.seconds:.2f} {unit}/s)" if pictures and result.seconds else ""
    return f"{verb} {what} in {result.seconds:.1f} s{speed}; results in {out}"


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
@click.option(
    "--no-masks",
    "write_masks",
    flag_value=False,
    default=True,
    help="Write no masks/ or masks_color/ (the metrics, report, thumbnails and --comparisons "
    "panels are still written; add --comparisons 0 for no panels).",
)
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
    """Evaluate HEAD (a .pth head, a run folder, or an .onnx from `export`) on a labelled
    dataset DATA_DIR, end to end from the images.

    Writes OUT/masks (raw class codes, 16-bit) and masks_color (neither with --no-masks),
    comparisons, thumbnails, report.html, evaluation_metrics.txt, per_class_metrics.png,
    confusion_matrix.png and, last, metrics.json. Rerunning the same command after an
    interruption resumes; under torchrun the ranks share the images.
    """
    from offroad_seg.inference.evaluate import evaluate

    result = evaluate(EvalConfig(head=head, data_dir=data_dir, out=out, **opts))
    if not is_main_rank():
        return
    click.echo(result.metrics.table(f"Evaluation of {head} on {data_dir}"))
    click.echo("")
    click.echo(result.hackathon.table())
    click.echo("\n" + _work_line("evaluated", result, out))


@cli.command()
@click.argument("head", type=click.Path(path_type=Path))
@paths_then_out("inputs", type=click.Path(path_type=Path))
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
    "--save-probs",
    is_flag=True,
    help="Also write each image's class probabilities, OUT/probs/STEM.npy: float16, "
    "(classes, H, W) at the image's size (not for video frames).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace everything offroad-seg wrote in OUT (rerunning the same command resumes).",
)
@stage
def predict(head: Path, inputs: tuple[Path, ...], out: Path, **opts) -> None:
    """Segment INPUTS with HEAD (a .pth head, a run folder, or an .onnx from `export`);
    results go to OUT.
    INPUTS are PNG or JPEG files, folders (a dataset folder's Color_Images), globs
    ('frames/*.jpg') and videos (.mp4, .mov, ...).

    Writes OUT/masks (raw class codes, 16-bit), masks_color, overlays (with a legend; an .mp4
    per video) and, last, predictions.json. Rerunning the same command resumes.
    """
    from offroad_seg.inference.predict import predict

    result = predict(PredictConfig(head=head, inputs=inputs, out=out, **opts))
    if is_main_rank():
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
    """Export HEAD (a .pth head or a run folder) with its backbone as one ONNX graph OUT
    (.onnx): uint8 RGB images (B, 3, rows, cols), resized as the tool resizes them, in; class
    logits at the input size and on the head's grid (and class ids with --argmax) out. The
    class map, preprocessing, backbone and head are in the model's metadata. Needs
    offroad-seg[export].
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
