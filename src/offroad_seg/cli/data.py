"""Commands about data and backbones: `synth` (synthetic scenes in the real dataset's format),
`demo` (synthetic scenes through extract, train and evaluate) and `backbones` (the variants).
"""

from __future__ import annotations

from pathlib import Path

import click

from offroad_seg.cli._common import LazyChoice, cli, stage
from offroad_seg.cli.training import _head_choices
from offroad_seg.config import DemoConfig, default
from offroad_seg.data.synthetic import SynthConfig


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


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
    click.echo(
        f"wrote {len(names['train'])} train and {len(names['val'])} val scenes "
        f"({width}x{height}) to {out}/train and {out}/val"
    )


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
@click.option(
    "--head",
    type=LazyChoice(_head_choices),
    default=default(DemoConfig, "head"),
    show_default=True,
    help="The head to train (as train's --head).",
)
@stage
def demo(
    out: Path, n_train: int, n_val: int, epochs: int, width: int, height: int, size, weights, head
):
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
        head=head,
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
    """List the DINOv2 and DINOv3 variants extract can use, with their weight files and
    whether they are on this machine (`local`: found without a download)."""
    import os

    from offroad_seg.models.variants import BACKBONES
    from offroad_seg.models.weights import local_weights

    click.echo(
        f"{'name':<20} {'family':<6} {'patch':>5} {'size':>7} {'params':>8} {'width':>5} "
        f"{'blocks':>6} {'registers':>9} {'local':>5}  weights"
    )
    found = []
    for v in BACKBONES.values():
        local = local_weights(v)
        if local is not None:
            found.append(f"{v.name}: {local}")
        click.echo(
            f"{v.name:<20} {v.family:<6} {v.patch_size:>5} {_size_text(v.default_size):>7} "
            f"{v.params_m:>7.0f}M {v.embed_dim:>5} {v.depth:>6} {v.registers:>9} "
            f"{'yes' if local else '-':>5}  {v.official_file}, {v.timm_repo}, {v.transformers_repo}"
        )
    for line in found:
        click.echo(f"local {line}")
    if os.environ.get("OFFROAD_SEG_WEIGHTS"):
        click.echo(
            f"$OFFROAD_SEG_WEIGHTS={os.environ['OFFROAD_SEG_WEIGHTS']} is used in place of "
            "these for the backbone whose weights it holds"
        )
    click.echo(
        "DINOv3 weights are under Meta's DINOv3 License, not Apache-2.0; its terms are yours to "
        "accept with the weights (docs/backbones.md)."
    )
