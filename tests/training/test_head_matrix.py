"""Every head trains from the CLI on backbones' caches of every width and layer count, every
backbone's cache trains a head, and every head evaluates end to end.

Caches of ViT-S (1 and 4 layers) and ViT-B with registers are extracted by the real backbones
(random weights); ViT-L and ViT-g caches (1024 and 1536 channels, 4 and 1 layers) are written
directly with random features, since a head only sees channels and layers (building ViT-g
takes 4.4 GB and a minute)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from offroad_seg.cli import cli
from offroad_seg.data.classes import ClassMap
from offroad_seg.features.cache import FeatureCache
from offroad_seg.features.cache_format import CacheSpec
from offroad_seg.features.extract import extract
from offroad_seg.metrics.hackathon import HACKATHON_SIZE, to_hackathon_ids
from offroad_seg.models.backbone import BackboneSpec
from offroad_seg.models.checkpoint import load_checkpoint
from offroad_seg.models.heads import head_names
from offroad_seg.models.preprocess import Preprocessing
from tests.conftest import SIZE, extract_config

BACKBONE_CACHES = ["vits14-l1", "vits14-l4", "vitb14_reg-l1", "vitl14-l4", "vitg14_reg-l1"]


def synthetic_cache(path, name: str, layers: int, n: int, seed: int):
    """A finished cache of random features for backbone `name`, with blocky labels."""
    rng = np.random.default_rng(seed)
    spec = CacheSpec(
        backbone=BackboneSpec("0" * 64, "synthetic", layers, name),
        preprocessing=Preprocessing(size=SIZE),
        class_map=ClassMap.default(),
        names=tuple(f"{i:04d}.png" for i in range(n)),
        sources_digest="synthetic",
        images_per_chunk=2,
    )
    cache = FeatureCache.create(path, spec)
    h, w = spec.preprocessing.grid
    for chunk in range(cache.num_chunks):
        start, stop = cache.chunk_range(chunk)
        feats = rng.standard_normal((stop - start, 1, spec.backbone.channels, h, w))
        coarse = rng.integers(0, 11, (stop - start, 1, h, w))
        labels = coarse.repeat(SIZE[0] // h, axis=2).repeat(SIZE[1] // w, axis=3)
        # the protocol's labels at its own size: the blocks again, nearest-neighbour
        rows = np.arange(HACKATHON_SIZE[0]) * h // HACKATHON_SIZE[0]
        cols = np.arange(HACKATHON_SIZE[1]) * w // HACKATHON_SIZE[1]
        blocks = coarse[:, 0][:, rows][:, :, cols]
        hackathon = to_hackathon_ids(blocks, spec.class_map).astype(np.uint8)
        cache.write_chunk(chunk, feats.astype(np.float16), labels.astype(np.uint8), None, hackathon)
    cache.finalize()
    return path


@pytest.fixture(scope="module")
def backbone_caches(dataset, caches, tmp_path_factory):
    root = tmp_path_factory.mktemp("backbone-caches")
    out = {"vits14-l1": (caches["train"], caches["val"])}
    for key, kw in {
        "vits14-l4": dict(layers=4),
        "vitb14_reg-l1": dict(backbone="dinov2_vitb14_reg"),
    }.items():
        pair = tuple(root / f"{key}-{split}.zarr" for split in ("train", "val"))
        for split, path in zip(("train", "val"), pair, strict=True):
            extract(extract_config(dataset / split, path, **kw))
        out[key] = pair
    for key, name, layers in (
        ("vitl14-l4", "dinov2_vitl14", 4),
        ("vitg14_reg-l1", "dinov2_vitg14_reg", 1),
    ):
        out[key] = tuple(
            synthetic_cache(root / f"{key}-{split}.zarr", name, layers, n, seed)
            for split, n, seed in (("train", 6, 1), ("val", 3, 2))
        )
    return out


def cells() -> list[tuple[str, str]]:
    """Every head on a 1-layer and a 4-layer cache of other widths (384; 4 x 1024), and every
    other cache under a head of its own, taken in turn (a head sees channels and layers)."""
    heads = head_names()
    both = [(key, head) for key in ("vits14-l1", "vitl14-l4") for head in heads]
    others = [k for k in BACKBONE_CACHES if k not in ("vits14-l1", "vitl14-l4")]
    return both + [(key, heads[i % len(heads)]) for i, key in enumerate(others)]


@pytest.mark.parametrize(("key", "head"), cells())
def test_every_head_trains_on_every_backbones_cache(backbone_caches, head, key, tmp_path):
    train_cache, val_cache = backbone_caches[key]
    out = tmp_path / "run"
    args = ["train", train_cache, out, "--val-cache", val_cache, "--head", head]
    args += ["--epochs", "1", "--batch-size", "3", "--device", "cpu"]
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    ckpt = load_checkpoint(out / "segmentation_head.pth")
    cache = FeatureCache.open(train_cache)
    assert ckpt.head_config.name == head
    assert ckpt.backbone.name == cache.spec.backbone.name
    assert ckpt.head_config.in_channels == cache.channels
    assert ckpt.head_config.layers == cache.spec.backbone.layers
    assert 0 <= ckpt.payload["best"]["val_miou"] <= 1


@pytest.mark.parametrize("head", head_names())
def test_every_head_evaluates_end_to_end(caches, dataset, head, tmp_path):
    run = tmp_path / "run"
    train_args = ["train", caches["train"], run, "--head", head, "--epochs", "1", "--device", "cpu"]
    assert CliRunner().invoke(cli, [str(a) for a in train_args]).exit_code == 0
    out = tmp_path / "eval"
    args = ["evaluate", run / "segmentation_head.pth", dataset / "val", out]
    args += ["--workers", "0", "--device", "cpu", "--comparisons", "0"]
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    assert (out / "metrics.json").exists() and len(list((out / "masks").iterdir())) == 3
