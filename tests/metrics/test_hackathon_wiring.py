"""The hackathon protocol where users read it: the cache's stored protocol labels, training's
validation, and evaluate, each against a direct computation. The protocol scores at the
starter's 266x476 whatever the model's working size (these tests' caches are smaller)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from offroad_seg.cli import cli
from offroad_seg.data.classes import ClassMap
from offroad_seg.data.dataset import list_samples
from offroad_seg.data.images import read_mask
from offroad_seg.features.cache import FeatureCache
from offroad_seg.metrics.hackathon import (
    HACKATHON_SIZE,
    hackathon_image_counts,
    hackathon_scores,
    hackathon_truth,
)
from offroad_seg.models.checkpoint import load_checkpoint
from tests.conftest import SIZE


def test_cache_stores_the_protocols_labels(caches, dataset):
    cache = FeatureCache.open(caches["val"])
    stored = cache.hackathon_labels()
    assert SIZE != HACKATHON_SIZE  # the protocol's own size, not the working size
    assert stored.shape == (3, *HACKATHON_SIZE) and stored.dtype == np.uint8
    for i, sample in enumerate(list_samples(dataset / "val")):
        truth = hackathon_truth(read_mask(sample.mask), HACKATHON_SIZE)
        np.testing.assert_array_equal(stored[i], truth)


@pytest.fixture(scope="module")
def run(caches, tmp_path_factory):
    out = tmp_path_factory.mktemp("hack") / "run"
    args = ["train", caches["train"], out, "--val-cache", caches["val"], "--epochs", "2",
            "--device", "cpu", "--lr", "2e-3"]  # fmt: skip
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return out


def test_training_reports_the_protocol_on_its_validation_cache(run, caches):
    ckpt = load_checkpoint(run / "segmentation_head.pth")
    saved = ckpt.payload["val_hackathon"]
    cache = FeatureCache.open(caches["val"])
    feats, _ = cache.load()
    head = ckpt.build()
    counts = []
    hack_ids = ClassMap.hackathon().codes_to_ids(ClassMap.default().codes)  # id -> protocol id
    with torch.no_grad():
        logits = head(torch.from_numpy(feats[:, 0].astype(np.float32)))
        up = F.interpolate(logits, size=HACKATHON_SIZE, mode="bilinear", align_corners=False)
    for i, pred in enumerate(up.argmax(1).numpy()):
        counts.append(hackathon_image_counts(hack_ids[pred], cache.hackathon_labels()[i]))
    expected = hackathon_scores(list(cache.spec.names), counts)
    assert saved["miou"] == pytest.approx(expected.miou, abs=1e-12)
    assert saved["dice"] == pytest.approx(expected.dice, abs=1e-12)
    history = json.loads((run / "train_stats" / "history.json").read_text())["history"]
    best = ckpt.payload["best"]["epoch"]
    assert history[best - 1]["val_hackathon_miou"] == pytest.approx(expected.miou, abs=1e-12)
    text = (run / "train_stats" / "evaluation_metrics.txt").read_text()
    assert "hackathon protocol (for comparison only)" in text


def test_evaluate_reports_it_beside_ours(run, dataset, tmp_path):
    out = tmp_path / "eval"
    args = ["evaluate", run / "segmentation_head.pth", dataset / "val", out,
            "--workers", "0", "--device", "cpu"]  # fmt: skip
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    assert "hackathon protocol (for comparison only)" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    trained = load_checkpoint(run / "segmentation_head.pth").payload["val_hackathon"]
    # the same protocol on the same images; evaluate runs the backbone in float32, the cache
    # holds float16 features, so predictions may differ at a few boundary pixels
    assert metrics["hackathon_protocol"]["miou"] == pytest.approx(trained["miou"], abs=0.02)
