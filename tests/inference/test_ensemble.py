"""Ensembles of heads: one checkpoint whose inference runs the backbone once and averages the
members' probabilities, taken by evaluate, predict, `Segmenter` and `info` like a head (export:
tests/inference/test_export.py; sweep --ensemble-top: tests/training/test_sweep.py; members
with tuned blocks: tests/inference/test_ensemble_tuned.py)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from offroad_seg.api import Segmenter
from offroad_seg.cli import cli
from offroad_seg.data.classes import ClassMap
from offroad_seg.data.dataset import list_samples
from offroad_seg.data.images import read_image, read_mask
from offroad_seg.errors import OffroadSegError
from offroad_seg.inference.evaluate import EvalConfig, evaluate
from offroad_seg.models.checkpoint import head_payload, load_checkpoint, save_checkpoint
from offroad_seg.models.ensemble import write_ensemble
from offroad_seg.models.heads import HeadConfig, build_head
from offroad_seg.models.preprocess import Preprocessing, image_to_tensor, preprocess, resize_image
from offroad_seg.models.segmentation import SegmentationModel
from tests.conftest import SIZE


def make_head(path, backbone, name, seed, size=SIZE, **extra):
    """A random head checkpoint on the session's random backbone (what the caches hold)."""
    cfg = HeadConfig(name=name, in_channels=backbone.spec.channels)
    torch.manual_seed(seed)
    module = build_head(cfg)
    if name == "linear":  # running statistics of the features' scale, as training leaves
        module.norm.running_var.fill_(0.05)
    prep = Preprocessing(size=size)
    payload = head_payload(
        cfg, ClassMap.default(), backbone.spec, prep, state_dict=module.state_dict(), **extra
    )
    save_checkpoint(path, payload)
    return path


@pytest.fixture(scope="module")
def heads(backbone, tmp_path_factory):
    """Two members with different output grids (linear: the token grid; upnext: x4), their
    ensemble, and a one-member ensemble."""
    root = tmp_path_factory.mktemp("ensemble")
    a = make_head(root / "a.pth", backbone, "linear", seed=1)
    b = make_head(root / "b.pth", backbone, "upnext", seed=2)
    write_ensemble([a, b], root / "ab.pth")
    write_ensemble([b], root / "b-only.pth")
    return {"a": a, "b": b, "ab": root / "ab.pth", "b-only": root / "b-only.pth"}


def mean_probabilities(members, backbone, x):
    """The members' softmax probabilities averaged on the finest member grid (a coarser
    member's logits upsampled there first), computed member by member from their own
    checkpoints."""
    with torch.no_grad():
        feats = backbone(x)
        logits = [load_checkpoint(path).build()(feats) for path in members]
    rows = max(z.shape[-2] for z in logits)
    cols = max(z.shape[-1] for z in logits)
    up = [F.interpolate(z, size=(rows, cols), mode="bilinear", align_corners=False) for z in logits]
    return torch.stack([z.softmax(1) for z in up]).mean(0)


def test_ensemble_probabilities_are_the_mean_of_the_members(heads, backbone, dataset):
    samples = list_samples(dataset / "val")
    rgb = [image_to_tensor(read_image(s.image)) for s in samples]
    x = preprocess(rgb, Preprocessing(size=SIZE))
    ckpt = load_checkpoint(heads["ab"])  # (evaluate below loads it with from_checkpoint)
    model = SegmentationModel(backbone, ckpt.build(), ckpt)
    assert [c.name for c in model.checkpoint.members] == ["linear", "upnext"]
    logits = model.logits(torch.cat([resize_image(r, Preprocessing(size=SIZE)) for r in rgb]))
    expected = mean_probabilities([heads["a"], heads["b"]], backbone, x)
    assert logits.shape == expected.shape == (3, 11, SIZE[0] // 14 * 4, SIZE[1] // 14 * 4)
    torch.testing.assert_close(logits.softmax(1), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits.exp(), expected, rtol=0, atol=1e-6)  # log-probabilities
    # the members disagree somewhere, so the mean is not one of them
    single = mean_probabilities([heads["b"]], backbone, x)
    assert (single - expected).abs().max() > 1e-2


def test_ensemble_of_one_gives_the_members_masks(heads, backbone, dataset):
    def segmenter(path):  # as Segmenter.from_checkpoint builds it, on the session's backbone
        ckpt = load_checkpoint(path)
        return Segmenter(SegmentationModel(backbone, ckpt.build(), ckpt))

    member, alone = segmenter(heads["b"]), segmenter(heads["b-only"])
    for s in list_samples(dataset / "val"):
        image = read_image(s.image)
        np.testing.assert_array_equal(alone(image), member(image))


def test_evaluate_on_an_ensemble_equals_a_python_computation(heads, backbone, dataset, tmp_path):
    result = evaluate(
        EvalConfig(heads["ab"], dataset / "val", tmp_path / "e", workers=0, progress=False)
    )
    cm = ClassMap.default()
    lut = np.zeros(int(max(cm.codes)) + 1, np.int64)
    lut[np.asarray(cm.codes)] = np.arange(cm.num_classes)
    conf = np.zeros((11, 11), np.int64)
    for s in list_samples(dataset / "val"):
        rgb = read_image(s.image)
        x = preprocess(image_to_tensor(rgb), Preprocessing(size=SIZE))
        probs = mean_probabilities([heads["a"], heads["b"]], backbone, x)
        full = F.interpolate(probs.log(), size=rgb.shape[:2], mode="bilinear", align_corners=False)
        pred = full.argmax(1)[0].numpy()
        truth = lut[read_mask(s.mask)]
        np.add.at(conf, (truth.ravel(), pred.ravel()), 1)
        np.testing.assert_array_equal(lut[read_mask(tmp_path / "e" / "masks" / s.name)], pred)
    np.testing.assert_array_equal(result.metrics.confusion, conf)
    report = json.loads((tmp_path / "e" / "metrics.json").read_text())
    tp = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    assert report["miou"] == pytest.approx(float(np.mean(tp[present] / union[present])))


def test_members_that_differ_are_refused_in_one_line(heads, backbone, tmp_path):
    other = make_head(tmp_path / "small.pth", backbone, "linear", seed=3, size=(42, 84))
    r = CliRunner().invoke(cli, ["ensemble", str(heads["a"]), str(other), "-o", tmp_path / "x"])
    assert r.exit_code == 1 and not (tmp_path / "x").exists()
    line = r.stderr.strip()
    assert "\n" not in line and str(heads["a"]) in line and str(other) in line
    assert "working size 56x98 vs 42x84" in line
    with pytest.raises(OffroadSegError, match="is an ensemble already"):
        write_ensemble([heads["ab"], heads["a"]], tmp_path / "z.pth")


def test_cli_ensemble_and_info(heads, tmp_path):
    out = tmp_path / "e.pth"
    r = CliRunner().invoke(cli, ["ensemble", str(heads["a"]), str(heads["b"]), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "an ensemble of 2 heads (linear, upnext)" in r.output
    r = CliRunner().invoke(cli, ["ensemble", str(heads["a"]), "-o", str(out)])
    assert r.exit_code == 1 and "--overwrite" in r.stderr
    r = CliRunner().invoke(cli, ["info", str(out)])
    assert r.exit_code == 0, r.output
    assert "ensemble     2 heads, probabilities averaged" in r.output
    assert "  member 0   linear (dropout 0); from " in r.output
    assert "  member 1   upnext (width 96, depth 2, dropout 0.1, kernel_size 7," in r.output
    assert f"; from {heads['b']}\n" in r.output
