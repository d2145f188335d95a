"""A bigger backbone end to end from the CLI: ViT-B/14 with registers, official weights file,
`--layers 4`: cached features equal the official code's, and train / evaluate / predict run on
the cache and read the backbone from it and from the head."""

from __future__ import annotations

import json

import numpy as np
import torch
from click.testing import CliRunner

from offroad_seg.cli import cli
from offroad_seg.data.dataset import list_samples
from offroad_seg.data.images import read_image
from offroad_seg.features.cache import FeatureCache
from offroad_seg.models.checkpoint import load_checkpoint
from offroad_seg.models.preprocess import Preprocessing, image_to_tensor, preprocess
from offroad_seg.models.variants import get_variant
from tests.conftest import SIZE
from tests.dinov2_reference import official_features
from tests.models.test_backbone import random_official_state_dict


def run(*args) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_vitb14_reg_end_to_end(dataset, tmp_path):
    variant = get_variant("dinov2_vitb14_reg")
    official = random_official_state_dict(variant, variant.depth, seed=5)
    weights = tmp_path / variant.official_file
    torch.save(official, weights)
    size = f"{SIZE[0]}x{SIZE[1]}"
    common = ["--backbone", variant.name, "--weights", weights, "--size", size, "--layers", "4"]
    common += ["--workers", "0", "--batch-size", "4"]
    run("extract", dataset / "train", tmp_path / "train.zarr", *common, "--views", "flip")
    run("extract", dataset / "val", tmp_path / "val.zarr", *common)

    cache = FeatureCache.open(tmp_path / "val.zarr")
    assert cache.spec.backbone.name == variant.name and cache.channels == 4 * 768
    features, _ = cache.load()
    prep = Preprocessing(size=SIZE)
    for i, sample in enumerate(list_samples(dataset / "val")):
        x = preprocess(image_to_tensor(read_image(sample.image)), prep)
        ref = official_features(official, x, 4, variant.num_heads)[0]
        cached = torch.from_numpy(features[i, 0].astype(np.float32))
        assert float((cached - ref).norm() / ref.norm()) < 1e-3  # float16 storage
    info = run("cache", "info", tmp_path / "val.zarr")
    assert "dinov2_vitb14_reg layers=4 channels=3072" in info

    head_dir = tmp_path / "head"
    run("train", tmp_path / "train.zarr", head_dir, "--val-cache", tmp_path / "val.zarr",
        "--epochs", "2", "--batch-size", "2", "--device", "cpu")  # fmt: skip
    ckpt = load_checkpoint(head_dir / "segmentation_head.pth")
    assert ckpt.backbone.name == variant.name and ckpt.head_config.in_channels == 3072
    # evaluate and predict find the backbone and its weights from the head alone
    head = head_dir / "segmentation_head.pth"
    run("evaluate", head, dataset / "val", tmp_path / "eval", "--workers", "0", "--device", "cpu")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["backbone"]["name"] == variant.name and metrics["images"] == 3
    run("predict", head, dataset / "val", tmp_path / "pred", "--workers", "0", "--device", "cpu")
    assert len(list((tmp_path / "pred" / "masks").iterdir())) == 3
