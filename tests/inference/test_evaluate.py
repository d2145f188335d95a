import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from offroad_seg.cli import cli
from offroad_seg.data.classes import ClassMap
from offroad_seg.data.dataset import list_samples
from offroad_seg.data.images import read_image, read_mask
from offroad_seg.errors import OffroadSegError, WeightsError
from offroad_seg.inference.evaluate import EvalConfig, evaluate
from offroad_seg.inference.predict import PredictConfig, predict
from offroad_seg.models.checkpoint import load_checkpoint, save_checkpoint
from offroad_seg.models.heads import HeadConfig, build_head
from offroad_seg.models.preprocess import image_to_tensor, preprocess
from offroad_seg.training.loop import TrainConfig, train


@pytest.fixture(scope="module")
def head_path(caches, tmp_path_factory):
    out = tmp_path_factory.mktemp("head")
    train(
        TrainConfig(
            caches=(caches["train"],),
            out=out,
            val_cache=caches["val"],
            epochs=4,
            batch_size=2,
            lr=2e-3,
            progress=False,
            device="cpu",
        )
    )
    return out / "segmentation_head.pth"


def eval_config(head, data, out, **kw):
    return EvalConfig(head=head, data_dir=data, out=out, **{"workers": 0, "progress": False, **kw})


def direct_predictions(head_path, backbone, image_path, tta=False):
    """head(backbone(preprocess(image))) upsampled to the image, computed here by hand.
    Returns the argmax and a mask of the pixels whose top two logits differ by more than
    float rounding (elsewhere another exact bilinear implementation may break the tie
    differently)."""
    ckpt = load_checkpoint(head_path)
    head = ckpt.build()
    rgb = read_image(image_path)
    x = preprocess(image_to_tensor(rgb), ckpt.preprocessing)
    with torch.no_grad():
        logits = head(backbone(x))
        if tta:
            logits = 0.5 * (logits + head(backbone(x.flip(-1))).flip(-1))
        logits = F.interpolate(logits, size=rgb.shape[:2], mode="bilinear", align_corners=False)
    top2 = logits.topk(2, dim=1).values[0]
    decided = (top2[0] - top2[1]) > 1e-4
    assert decided.float().mean() > 0.999
    return logits.argmax(1)[0].numpy(), decided.numpy()


def test_metrics_json_equals_recomputation_from_written_masks(head_path, dataset, tmp_path):
    result = evaluate(eval_config(head_path, dataset / "val", tmp_path / "e", comparisons=2))
    report = json.loads((tmp_path / "e" / "metrics.json").read_text())
    cm = ClassMap.default()
    lut = {int(c): i for i, c in enumerate(cm.codes)}
    conf = np.zeros((11, 11), np.int64)
    for s in list_samples(dataset / "val"):
        pred = np.vectorize(lut.get)(read_mask(tmp_path / "e" / "masks" / s.name))
        truth = np.vectorize(lut.get)(read_mask(s.mask))
        np.add.at(conf, (truth.ravel(), pred.ravel()), 1)
    tp = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - tp
    present = (conf.sum(0) + conf.sum(1)) > 0
    iou = tp[present] / union[present]
    dice = 2 * tp[present] / (conf.sum(0) + conf.sum(1))[present]
    assert report["miou"] == pytest.approx(iou.mean(), abs=1e-12)
    assert report["mean_dice"] == pytest.approx(dice.mean(), abs=1e-12)
    assert report["pixel_accuracy"] == pytest.approx(tp.sum() / conf.sum(), abs=1e-12)
    assert report["confusion_matrix"] == conf.tolist()
    assert report["images"] == 3 and result.metrics.miou == report["miou"]
    assert report["loss"] > 0
    names = sorted(p.name for p in (tmp_path / "e" / "comparisons").iterdir())
    assert names == sorted(s.name for s in list_samples(dataset / "val"))[:2]
    for name in ("evaluation_metrics.txt", "per_class_metrics.png", "confusion_matrix.png"):
        assert (tmp_path / "e" / name).stat().st_size > 0
    assert "Mean IoU" in (tmp_path / "e" / "evaluation_metrics.txt").read_text()


def test_batch_size_does_not_change_metrics(head_path, dataset, tmp_path):
    a = evaluate(eval_config(head_path, dataset / "val", tmp_path / "a", batch_size=1))
    b = evaluate(eval_config(head_path, dataset / "val", tmp_path / "b", batch_size=4))
    np.testing.assert_array_equal(a.metrics.confusion, b.metrics.confusion)
    assert a.metrics.loss == pytest.approx(b.metrics.loss, rel=1e-6)


def test_predictions_equal_direct_computation_and_masks_round_trip(
    head_path, dataset, backbone, tmp_path
):
    evaluate(eval_config(head_path, dataset / "val", tmp_path / "e", comparisons=0))
    cm = ClassMap.default()
    for s in list_samples(dataset / "val"):
        expected, decided = direct_predictions(head_path, backbone, s.image)
        written = read_mask(tmp_path / "e" / "masks" / s.name)
        assert Image.open(tmp_path / "e" / "masks" / s.name).mode == "I;16"
        np.testing.assert_array_equal(written[decided], cm.codes[expected][decided])
        color = np.asarray(Image.open(tmp_path / "e" / "masks_color" / s.name).convert("RGB"))
        np.testing.assert_array_equal(color[decided], cm.palette[expected][decided])


def test_tta_flip_averages_mirrored_logits(head_path, dataset, backbone, tmp_path):
    evaluate(eval_config(head_path, dataset / "val", tmp_path / "t", comparisons=0, tta="flip"))
    s = list_samples(dataset / "val")[0]
    expected, decided = direct_predictions(head_path, backbone, s.image, tta=True)
    written = read_mask(tmp_path / "t" / "masks" / s.name)
    np.testing.assert_array_equal(written[decided], ClassMap.default().codes[expected][decided])


def test_other_weights_refused(head_path, dataset, tmp_path, backbone):
    sd = {k: v.clone().contiguous() for k, v in backbone.vit.state_dict().items()}
    sd["norm.bias"] += 1
    save_file(sd, tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match="trained on other backbone weights"):
        evaluate(
            eval_config(
                head_path,
                dataset / "val",
                tmp_path / "e",
                weights=str(tmp_path / "other.safetensors"),
            )
        )
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_other_class_map_refused(head_path, dataset, tmp_path):
    other = tmp_path / "classes.json"
    other.write_text(json.dumps([{"code": 0, "name": "x", "color": [0, 0, 0]}]))
    with pytest.raises(OffroadSegError, match="another class map"):
        evaluate(eval_config(head_path, dataset / "val", tmp_path / "e", class_map=other))
    # a head whose class map lacks codes the masks use: the masks are refused by name
    payload = load_checkpoint(head_path).payload
    payload = {**payload, "class_map": ClassMap.default().to_dict()[:-1]}
    payload["head_config"] = {**payload["head_config"], "num_classes": 10}
    # a 10-class head of the same kind (any head: the masks are refused before it runs)
    payload["state_dict"] = build_head(HeadConfig.from_dict(payload["head_config"])).state_dict()
    save_checkpoint(tmp_path / "ten.pth", payload)
    with pytest.raises(OffroadSegError, match=r"\.png: unknown class codes 10000"):
        evaluate(eval_config(tmp_path / "ten.pth", dataset / "val", tmp_path / "e2"))
    assert not (tmp_path / "e2" / "metrics.json").exists()


def test_existing_results_refused_unless_overwrite(head_path, dataset, tmp_path):
    evaluate(eval_config(head_path, dataset / "val", tmp_path / "e", comparisons=0))
    held = r"holds the results of another run \(comparisons 0 then, 10 now\)"
    with pytest.raises(OffroadSegError, match=held):
        evaluate(eval_config(head_path, dataset / "val", tmp_path / "e"))
    (tmp_path / "e" / "masks" / "stale.png").write_bytes(b"x")
    evaluate(eval_config(head_path, dataset / "val", tmp_path / "e", overwrite=True, comparisons=0))
    # a file the run did not write stays (#21): only what the run record lists is removed
    assert (tmp_path / "e" / "masks" / "stale.png").read_bytes() == b"x"


def test_predict_writes_masks_and_overlays(head_path, dataset, backbone, tmp_path):
    samples = list_samples(dataset / "val")
    loose = tmp_path / "loose.png"
    Image.open(samples[0].image).save(loose)
    # a dataset folder (its Color_Images/) and a single file, mixed
    result = predict(
        PredictConfig(
            head=head_path,
            inputs=(dataset / "val", loose),
            out=tmp_path / "p",
            workers=0,
            progress=False,
        )
    )
    assert result.images == 4
    cm = ClassMap.default()
    for s in samples:
        expected, decided = direct_predictions(head_path, backbone, s.image)
        written = read_mask(tmp_path / "p" / "masks" / s.name)
        np.testing.assert_array_equal(written[decided], cm.codes[expected][decided])
        rgb = read_image(s.image).astype(float)
        overlay = np.asarray(Image.open(tmp_path / "p" / "overlays" / s.name)).astype(float)
        ov = overlay[: rgb.shape[0]]  # the blend, above the legend
        blend = np.rint(0.5 * rgb + 0.5 * cm.palette[expected])
        np.testing.assert_allclose(ov[decided], blend[decided], atol=1)
    manifest = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert len(manifest["images"]) == 4
    np.testing.assert_array_equal(
        read_mask(tmp_path / "p" / "masks" / "loose.png"),
        read_mask(tmp_path / "p" / "masks" / samples[0].name),
    )
    with pytest.raises(OffroadSegError, match="same file name"):
        predict(
            PredictConfig(
                head=head_path, inputs=(dataset / "val", samples[0].image), out=tmp_path / "q"
            )
        )


def test_cli_evaluate_prints_table(head_path, dataset, tmp_path):
    r = CliRunner().invoke(
        cli,
        ["evaluate", str(head_path), str(dataset / "val"), str(tmp_path / "e"), "--workers", "0"],
    )
    assert r.exit_code == 0, r.output
    assert "Mean IoU" in r.stdout and "images/s" in r.stdout


def test_demo_end_to_end_tiny(tmp_path):
    out = tmp_path / "demo"

    def run_demo(train: int, val: int, epochs: int):
        tiny = f"--train {train} --val {val} --epochs {epochs} --width 196 --height 112"
        return CliRunner().invoke(
            cli, ["demo", "--out", str(out), *tiny.split(), "--size", "56x98"]
        )

    r = run_demo(4, 2, 2)
    assert r.exit_code == 0, r.output
    assert "UNTRAINED" in r.stderr
    assert "Mean IoU" in r.stdout and "[4/4] evaluate" in r.stderr
    for p in (
        "data/train/Color_Images",
        "cache/train.zarr/zarr.json",
        "cache/val.zarr/zarr.json",
        "head/segmentation_head.pth",
        "head/train_stats/training_curves.png",
        "predictions/metrics.json",
        "predictions/confusion_matrix.png",
        "predictions/per_class_metrics.png",
        "predictions/evaluation_metrics.txt",
    ):
        assert (out / p).exists(), p
    assert len(list((out / "predictions" / "masks").iterdir())) == 2
    assert len(list((out / "predictions" / "comparisons").iterdir())) == 2
    # the demo replaces its own folder, and refuses one it did not make
    assert run_demo(2, 1, 1).exit_code == 0
    assert len(list((out / "predictions" / "masks").iterdir())) == 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    r = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "mine")])
    assert r.exit_code == 1 and "not a demo folder" in r.stderr
    assert (tmp_path / "mine" / "thesis.tex").exists()
