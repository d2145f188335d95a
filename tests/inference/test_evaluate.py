import json
from dataclasses import replace

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
        # the image's own numbers (the report's row): IoU per class present in its truth or
        # prediction, their mean, pixel accuracy
        mine = report["per_image"][s.name]
        ious = {}
        for c, name in enumerate(cm.names):
            inter, union = np.sum((truth == c) & (pred == c)), np.sum((truth == c) | (pred == c))
            ious[name] = inter / union if union else None
            assert mine["iou"][name] == (pytest.approx(ious[name], abs=1e-12) if union else None)
        present = [v for v in ious.values() if v is not None]
        assert mine["miou"] == pytest.approx(np.mean(present), abs=1e-12)
        assert mine["pixel_accuracy"] == pytest.approx(np.mean(truth == pred), abs=1e-12)
    assert list(report["per_image"]) == [s.name for s in list_samples(dataset / "val")]
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


def test_predict_save_probs(head_path, dataset, backbone, tmp_path):
    out = tmp_path / "p"
    samples = list_samples(dataset / "val")[:2]
    cfg = PredictConfig(
        head=head_path, inputs=tuple(s.image for s in samples), out=out, workers=0,
        progress=False, overlays=False, save_probs=True,
    )  # fmt: skip
    predict(cfg)
    cm = ClassMap.default()
    assert sorted(p.name for p in (out / "probs").iterdir()) == [
        f"{s.image.stem}.npy" for s in samples
    ]
    for s in samples:
        probs = np.load(out / "probs" / f"{s.image.stem}.npy")
        h, w = read_mask(s.mask).shape
        assert probs.dtype == np.float16 and probs.shape == (11, h, w)
        # a distribution per pixel, to float16's rounding of 11 values
        np.testing.assert_allclose(probs.astype(np.float64).sum(0), 1.0, atol=2e-3)
        # its argmax is the written mask, wherever float16 did not round the top two together
        top2 = np.sort(probs, axis=0)[-2:]
        decided = top2[1] > top2[0]
        assert decided.mean() > 0.99
        ids = np.vectorize({int(c): i for i, c in enumerate(cm.codes)}.get)(
            read_mask(out / "masks" / s.name)
        )
        np.testing.assert_array_equal(probs.argmax(0)[decided], ids[decided])
    # the probabilities are the softmax of the full model's upsampled logits
    ckpt = load_checkpoint(head_path)
    rgb = read_image(samples[0].image)
    x = preprocess(image_to_tensor(rgb), ckpt.preprocessing)
    with torch.no_grad():
        logits = F.interpolate(
            ckpt.build()(backbone(x)), size=rgb.shape[:2], mode="bilinear", align_corners=False
        )
    expected = logits.softmax(1)[0].numpy()
    probs = np.load(out / "probs" / f"{samples[0].image.stem}.npy").astype(np.float32)
    np.testing.assert_allclose(probs, expected, atol=1e-3)
    assert json.loads((out / "predictions.json").read_text())["probs"] == "probs"
    # the run record lists them: the same command without --save-probs is another run, and
    # --overwrite removes them with the other outputs it wrote
    other = replace(cfg, save_probs=False)
    with pytest.raises(OffroadSegError, match="another run.*save_probs"):
        predict(other)
    predict(replace(other, overwrite=True))
    assert not (out / "probs").exists() or not any((out / "probs").iterdir())


def test_cli_evaluate_prints_table(head_path, dataset, tmp_path):
    r = CliRunner().invoke(
        cli,
        ["evaluate", str(head_path), str(dataset / "val"), str(tmp_path / "e"), "--workers", "0"],
    )
    assert r.exit_code == 0, r.output
    assert "Mean IoU" in r.stdout and "images/s" in r.stdout


def test_demo_end_to_end_tiny(tiny_demo, tmp_path):
    """The session's tiny demo (`tiny_demo`: --train 4 --val 2 --epochs 2 at 56x98) wrote
    every stage's outputs; a rerun replaces its own folder and refuses one it did not make."""
    import shutil

    assert "UNTRAINED" in (tiny_demo / "demo-log.txt").read_text()
    assert "[4/4] evaluate" in (tiny_demo / "demo-log.txt").read_text()
    assert "Mean IoU" in (tiny_demo / "demo-output.txt").read_text()
    demo = tiny_demo / "offroad-seg-demo"
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
        assert (demo / p).exists(), p
    assert len(list((demo / "predictions" / "masks").iterdir())) == 2
    assert len(list((demo / "predictions" / "comparisons").iterdir())) == 2
    out = tmp_path / "demo"
    shutil.copytree(demo, out)  # the session's demo stays as README's examples expect it
    tiny = "--train 2 --val 1 --epochs 1 --width 196 --height 112 --size 56x98"
    r = CliRunner().invoke(cli, ["demo", "--out", str(out), *tiny.split()])
    assert r.exit_code == 0, r.output
    assert len(list((out / "predictions" / "masks").iterdir())) == 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    r = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "mine")])
    assert r.exit_code == 1 and "not a demo folder" in r.stderr
    assert (tmp_path / "mine" / "thesis.tex").exists()


def test_demo_head_is_passed_to_training(tmp_path, monkeypatch):
    import offroad_seg.demo as demo_module
    from offroad_seg.config import DemoConfig
    from offroad_seg.errors import ConfigError

    trained = []

    class Trained(Exception):
        """Stops the demo once its training config is known."""

    def fake_train(cfg):
        trained.append(cfg)
        raise Trained

    class Extracted:
        def line(self):
            return "extracted"

    monkeypatch.setattr(demo_module, "synthesize", lambda cfg: None)
    monkeypatch.setattr(demo_module, "extract", lambda cfg: Extracted())
    monkeypatch.setattr(demo_module, "train", fake_train)
    args = ["demo", "--out", str(tmp_path / "d"), "--weights", "random"]
    r = CliRunner().invoke(cli, [*args, "--head", "linear"])
    assert isinstance(r.exception, Trained) and trained[-1].head == "linear"
    r = CliRunner().invoke(cli, args)  # the default: train's default head
    assert isinstance(r.exception, Trained) and trained[-1].head == TrainConfig.head
    r = CliRunner().invoke(cli, [*args, "--head", "nope"])
    assert r.exit_code == 2 and "'nope' is not one of" in r.stderr
    with pytest.raises(ConfigError, match="head 'nope'"):
        demo_module.demo(DemoConfig(out=tmp_path / "e", head="nope", weights="random"))
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize(
    ("images", "videos", "frames", "computed", "seconds", "expected"),
    [
        (3, 1, 30, 3, 11.7, "predicted 3 images and 1 video (30 frames) in 11.7 s (2.82 frames/s)"),
        (8, 0, 0, 8, 3.1, "predicted 8 images in 3.1 s (2.58 images/s)"),
        (0, 2, 10, 0, 2.0, "predicted 2 videos (10 frames) in 2.0 s (5.00 frames/s)"),
        (4, 0, 0, 0, 0.0, "all 4 images were already predicted"),
    ],
)
def test_work_line_counts_video_frames_in_the_rate(
    images, videos, frames, computed, seconds, expected, tmp_path
):
    from offroad_seg.cli.inference import _work_line
    from offroad_seg.inference.batches import EvalResult

    result = EvalResult(tmp_path, None, images, seconds, computed=computed)
    result.videos, result.frames = videos, frames
    assert _work_line("predicted", result, tmp_path) == f"{expected}; results in {tmp_path}"


def test_no_masks_writes_what_its_help_says(head_path, dataset, tmp_path):
    # --help: "Write no masks/ or masks_color/ (the metrics, report, thumbnails and
    # --comparisons panels are still written ...)" (#27 item 5)
    help_text = " ".join(CliRunner().invoke(cli, ["evaluate", "--help"]).stdout.split())
    said = "--no-masks Write no masks/ or masks_color/ (the metrics, report, thumbnails"
    assert said in help_text
    out = tmp_path / "e"
    args = ["evaluate", head_path, dataset / "val", out, "--no-masks", "--comparisons", "1",
            "--workers", "0"]  # fmt: skip
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    from offroad_seg.inference.evaluate import EVAL_FILES
    from offroad_seg.inference.runfolder import RECORDS_DIR, RUN_FILE

    names = sorted(s.output_name for s in list_samples(dataset / "val"))
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    written = {p for p in written if not p.startswith(RECORDS_DIR + "/")}
    assert written == {
        RUN_FILE,
        *EVAL_FILES,
        f"comparisons/{names[0]}",
        *(f"thumbnails/{n.removesuffix('.png')}.jpg" for n in names),
    }
    assert not (out / "masks").exists() and not (out / "masks_color").exists()


def test_report_says_where_the_backbone_weights_came_from(head_path, dataset, backbone, tmp_path):
    # #27 item 3: an untrained backbone is announced in report.html and evaluation_metrics.txt;
    # weights from a file are named with their sha256 prefix, without the banner
    from offroad_seg.reporting.provenance import UNTRAINED_BANNER

    ckpt = load_checkpoint(head_path)
    sha = ckpt.backbone.weights_sha256[:12]
    evaluate(eval_config(head_path, dataset / "val", tmp_path / "r", weights="random"))
    text = (tmp_path / "r" / "evaluation_metrics.txt").read_text()
    html = (tmp_path / "r" / "report.html").read_text()
    assert text.startswith(UNTRAINED_BANNER + "\n\n")
    assert f"backbone weights: random (untrained), sha256 {sha}\n" in text
    assert f'<p class="banner" role="alert">{UNTRAINED_BANNER}</p>' in html
    assert f"<td>random (untrained), sha256 {sha}</td>" in html
    # the head and its training, from the checkpoint
    s = ckpt.payload["train_config"]
    assert "head model: upnext (width 96, depth 2, dropout 0.1)\n" in text
    training = (
        f"loss {s['loss']}, class weights {s['class_weights']}, AdamW lr {s['lr']:g}, batch 2, "
        f"4 epochs, seed 0; saved at epoch {ckpt.payload['epoch']} (best val mIoU "
        f"{ckpt.payload['best']['val_miou']:.4f})"
    )
    assert f"\ntraining: {training}\n" in text and f"<td>{training}</td>" in html
    # the hackathon protocol's numbers, beside ours in the page too
    hackathon = json.loads((tmp_path / "r" / "metrics.json").read_text())["hackathon_protocol"]
    assert '<h2 id="hackathon">' in html and f">{hackathon['miou']:.4f}<" in html
    assert "confusion_matrix.png" not in html  # its table is in the page; the file stays
    assert (tmp_path / "r" / "confusion_matrix.png").is_file()

    # the same weights from a file (same tensors: the head accepts them)
    weights = tmp_path / "vits14.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.vit.state_dict().items()}, weights)
    evaluate(eval_config(head_path, dataset / "val", tmp_path / "f", weights=str(weights)))
    text = (tmp_path / "f" / "evaluation_metrics.txt").read_text()
    html = (tmp_path / "f" / "report.html").read_text()
    assert "UNTRAINED" not in text and 'class="banner"' not in html
    assert f"backbone weights: {weights}, sha256 {sha}\n" in text
    assert f"<td>{weights}, sha256 {sha}</td>" in html
    metrics = json.loads((tmp_path / "f" / "metrics.json").read_text())
    assert metrics["backbone"]["weights_source"] == str(weights)
