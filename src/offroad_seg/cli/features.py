"""Commands about feature caches: `extract` (the backbone once over a dataset, its patch
features into a cache) and `cache info` / `cache verify`.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from offroad_seg.cli._common import cli, fail, is_main_rank, stage
from offroad_seg.config import ExtractConfig, default

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
    "--block",
    type=int,
    default=None,
    help="Store a block cache for `train --tune`: the full token sequence ENTERING block K "
    "(0-based; the output of block K-1, before the final norm: class, register/storage and "
    "patch tokens) instead of the final features. Training then runs blocks K..N-1 "
    "[default: final features].",
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
    "--cache-version",
    type=click.Choice(["1", "2"]),
    default=str(default(ExtractConfig, "cache_version")),
    show_default=True,
    help="Cache format: 2 packs chunks into shards (~64x fewer files); 1 is a file per chunk.",
)
@click.option(
    "--chunks-per-shard",
    type=int,
    default=default(ExtractConfig, "chunks_per_shard"),
    help="Format 2: chunks per shard file [default: ~64 MiB of features per shard].",
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
            cache_version=int(opts.pop("cache_version")),
            views=views,
            size=parse_size(size) if (size := opts.pop("size")) else None,
            **opts,
        )
    )
    if is_main_rank():
        click.echo(summary.line())


@cli.group("cache")
def cache_group() -> None:
    """Inspect, check and migrate feature caches."""


@cache_group.command("info")
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@stage
def cache_info(cache: str, as_json: bool) -> None:
    """Show what a cache holds: images, views, arrays, size on disk, backbone, preprocessing,
    classes, fingerprint."""
    from offroad_seg.features.cache import FeatureCache

    info = FeatureCache.open(cache).info()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    f = info["features"]
    bb = info["backbone"]
    prep = info["preprocessing"]
    size, grid = prep["size"], prep["grid"]
    hackathon = info["hackathon_labels"]
    per_image = info["bytes_per_image"]
    lines = [
        f"cache        {info['path']}",
        f"status       {'complete' if info['complete'] else 'UNFINISHED'}"
        f" ({info['done']}/{info['images']} images)",
        f"views        {', '.join(info['views'])}",
        f"features     {tuple(f['shape'])} {f['dtype']}, chunks {tuple(f['chunks'])}"
        + (f", shards {tuple(f['shards'])}" if f["shards"] else ""),
        f"format       version {info['version']}"
        + (f", {info['chunks_per_shard']} chunks per shard" if info["version"] >= 2 else ""),
        f"labels       {tuple(info['labels']['shape'])} uint8 (255 = ignore)",
        "hackathon    "
        + (
            f"{tuple(hackathon['shape'])} uint8 (the hackathon protocol's labels)"
            if hackathon
            else "none (an older cache)"
        ),
        f"size         {size[0]}x{size[1]} -> {grid[0]}x{grid[1]} tokens of "
        f"{prep['patch_size']}x{prep['patch_size']} px",
        f"resize       images {prep['resize']}, labels {prep['label_resize']}",
        "normalise    mean "
        + ", ".join(f"{v:.3f}" for v in prep["mean"])
        + ", std "
        + ", ".join(f"{v:.3f}" for v in prep["std"]),
        f"backbone     {bb['name']} layers={bb['layers']} channels={bb['channels']}",
        *([f"block        {info['block']}"] if info.get("block") is not None else []),
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
        fail(f"{cache}: {plural(len(report.problems), 'problem')} found")
    done = report.images - report.unfinished
    state = (
        f"unfinished ({done} of {plural(report.images, 'image')} extracted)"
        if report.unfinished
        else "every image extracted, but not finalized"
    )
    fail(
        f"{cache}: {state}; rerun the same `offroad-seg extract` command to resume "
        "(what is there verified ok)"
    )


@cache_group.command("migrate")
@click.argument("cache")
@click.option(
    "--chunks-per-shard",
    type=int,
    default=default(ExtractConfig, "chunks_per_shard"),
    help="Chunks per shard file [default: ~64 MiB of features per shard].",
)
@stage
def cache_migrate(cache: str, chunks_per_shard: int) -> None:
    """Rewrite a format-1 cache (a file per chunk) as format 2 (chunks packed in shards), in
    place; an interrupted migration leaves a readable cache, and rerunning finishes it."""
    from offroad_seg.features.migrate import migrate

    click.echo(migrate(cache, chunks_per_shard).line())
