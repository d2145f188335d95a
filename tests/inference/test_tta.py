"""Multi-scale test-time augmentation: the logits equal a hand-written loop over the passes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from offroad_seg.api import Segmenter
from offroad_seg.cli import cli
from offroad_seg.data.dataset import list_samples
from offroad_seg.data.images import read_image, read_mask
from offroad_seg.errors import ConfigError
from offroad_seg.models.preprocess import Preprocessing, image_to_tensor, preprocess
from offroad_seg.models.segmentation import TTA
from offroad_seg.models.upsampling import predict_and_score, upsample_mean
from offroad_seg.training.loop import TrainConfig, train


@pytest.fixture(scope="module")
def head(caches, tmp_path_factory):
    out = tmp_path_factory.mktemp("tta-head")
    train(
        TrainConfig(
            caches=(caches["train"],), out=out, epochs=2, progress=False, device="cpu", lr=2e-3
        )
    )
    return out / "segmentation_head.pth"


def test_sizes_are_multiples_of_14():
    prep = Preprocessing(size=(266, 476))
    tta = TTA.of("flip", (0.75, 1, 1.25, 1.0))
    assert tta.sizes(prep) == [(196, 364), (266, 476), (336, 588)]  # 199.5->196, 357->364 ...
    assert all(r % 14 == 0 and c % 14 == 0 for r, c in tta.sizes(prep))
    assert tta.extra_sizes(prep) == ((196, 364), (336, 588))
    assert tta.passes(prep) == 6
    assert tta.describe(prep) == "flip, sizes 196x364, 266x476, 336x588 (6 passes)"
    assert TTA.of("none").describe(prep) == "none"
    with pytest.raises(ConfigError, match="scales"):
        TTA.of("flip", (0.5, -1))
    with pytest.raises(ConfigError, match="expected one of none, flip"):
        TTA.of("rotate")


def test_predict_and_score_averages_the_passes_after_upsampling():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(2, 5, *grid, generator=g) for grid in ((3, 5), (4, 7), (2, 4))]
    labels = torch.randint(0, 5, (2, 21, 37), generator=g)
    labels[0, :4] = 255
    ups = [F.interpolate(p, size=(21, 37), mode="bilinear", align_corners=False) for p in parts]
    mean = sum(ups) / 3
    pred, loss, count = predict_and_score(parts, labels, (21, 37), rows=8)
    assert torch.equal(pred, mean.argmax(1))
    ref = F.cross_entropy(mean, labels, ignore_index=255, reduction="sum")
    torch.testing.assert_close(loss.float(), ref, rtol=1e-5, atol=1e-4)
    assert count == (labels != 255).sum()
    torch.testing.assert_close(upsample_mean(parts, (21, 37)), mean, rtol=1e-5, atol=1e-5)


def test_tta_logits_equal_a_hand_written_loop(head, dataset):
    scales = (0.75, 1.0, 1.25)
    seg = Segmenter.from_checkpoint(head, device="cpu", tta="flip", tta_scales=scales)
    model = seg.model
    image = list_samples(dataset / "val")[0].image
    rgb = read_image(image)
    passes = []
    with torch.no_grad():
        for size in TTA.of("flip", scales).sizes(model.preprocessing):
            x = preprocess(image_to_tensor(rgb), Preprocessing(size=size))
            for flip in (False, True):
                logits = model.head(model.backbone(x.flip(-1) if flip else x))
                logits = logits.flip(-1) if flip else logits
                passes.append(
                    F.interpolate(logits, size=rgb.shape[:2], mode="bilinear", align_corners=False)
                )
    expected = (sum(passes) / len(passes))[0]
    pred = seg.predict(image, logits=True)
    torch.testing.assert_close(torch.from_numpy(pred.logits), expected, rtol=1e-4, atol=1e-4)
    assert (pred.ids == expected.argmax(0).numpy()).mean() > 0.999
    # and it is not the plain prediction
    plain = Segmenter.from_checkpoint(head, device="cpu").predict(image, logits=True)
    assert np.abs(plain.logits - pred.logits).max() > 1e-3


def test_evaluate_and_predict_with_multi_scale_tta(head, dataset, tmp_path):
    tta = ["--tta", "flip", "--tta-scales", "0.75,1,1.25", "--workers", "0", "--device", "cpu"]
    out = tmp_path / "eval"
    args = ["evaluate", head, dataset / "val", out, "--comparisons", "1", *tta]
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tta"] == "flip, sizes 42x70, 56x98, 70x126 (6 passes)"
    assert "flip, sizes 42x70, 56x98, 70x126" in (out / "evaluation_metrics.txt").read_text()
    # the masks equal the Python API's with the same passes
    seg = Segmenter.from_checkpoint(head, device="cpu", tta="flip", tta_scales=(0.75, 1, 1.25))
    for sample in list_samples(dataset / "val"):
        written = read_mask(out / "masks" / sample.name)
        np.testing.assert_array_equal(seg.predict(sample.image).codes, written)
