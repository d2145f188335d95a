import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from offroad_seg.cli import cli
from offroad_seg.errors import CacheError, OffroadSegError
from offroad_seg.features.cache import FeatureCache
from offroad_seg.features.extract import extract
from offroad_seg.models.checkpoint import load_checkpoint
from offroad_seg.models.heads import HeadConfig, build_head
from offroad_seg.models.preprocess import Preprocessing
from offroad_seg.training.loop import TrainConfig, lr_at, train
from offroad_seg.training.losses import class_weights_from_pixels
from offroad_seg.training.sources import StreamingSource
from offroad_seg.training.validation import evaluate_on_cache
from tests.conftest import SIZE, extract_config, interrupted_in_epoch
from tests.training.online import online_losses


def train_config(caches, out, **kw) -> TrainConfig:
    defaults = dict(epochs=2, batch_size=2, progress=False, device="cpu")
    return TrainConfig(caches=tuple(caches), out=out, **{**defaults, **kw})


@pytest.fixture(scope="module")
def cache_fp32(dataset, tmp_path_factory):
    path = tmp_path_factory.mktemp("fp32") / "train.zarr"
    extract(extract_config(dataset / "train", path, views=("identity", "hflip"), dtype="float32"))
    return path


@pytest.fixture(scope="module")
def cache_4layers(dataset, tmp_path_factory):
    path = tmp_path_factory.mktemp("l4") / "train.zarr"
    extract(extract_config(dataset / "train", path, layers=4))
    return path


def test_auto_class_weights_formula():
    pixels = np.array([100, 0, 400, 1000, 10, 2_000_000])
    w = class_weights_from_pixels(pixels)
    present = pixels[pixels > 0]
    freq = present / present.sum()
    median = np.median(freq)
    expected = np.zeros(6)
    expected[pixels > 0] = np.clip(median / freq, 0.1, 10)
    np.testing.assert_allclose(w, expected)
    assert w[1] == 0 and w[4] == 10 and w[5] == pytest.approx(0.1)
    # a hand-checked value: median of the five frequencies is 400/total, so class 2 has 1
    assert w[2] == pytest.approx(1.0)


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.0)


def test_cached_training_equals_online_training(cache_fp32, dataset, backbone, tmp_path):
    """The cache changes speed, never results: the same head trained online (decode ->
    preprocess -> backbone -> head every step, same seed and order) gives the same losses
    and weights."""
    epochs, bs, seed = 2, 2, 7
    result = train(
        train_config([cache_fp32], tmp_path / "run", epochs=epochs, batch_size=bs, seed=seed)
    )

    torch.manual_seed(seed)
    head = build_head(HeadConfig(in_channels=384, num_classes=11))  # the default head

    def forward(x):
        with torch.no_grad():
            feats = backbone(x)
        return head(feats)

    losses = online_losses(dataset / "train", SIZE, head, forward, seed, epochs, bs)

    np.testing.assert_allclose(result.step_losses, losses, rtol=1e-5)
    trained = load_checkpoint(tmp_path / "run" / "segmentation_head.pth").build()
    for (name, a), b in zip(trained.state_dict().items(), head.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


# the seed head on 4 layers (its first conv on 1536 channels: 7 s here) trains in
# test_head_matrix.py; learning with 4 layers is shown by convnext's
@pytest.mark.parametrize(("layers", "head"), [(1, "convnext"), (1, "seed"), (4, "convnext")])
def test_head_overfits_tiny_split(head, layers, caches, cache_4layers, tmp_path):
    cache = caches["train"] if layers == 1 else cache_4layers
    cfg = train_config([cache], tmp_path / "run", head=head, width=64, epochs=30, lr=3e-3)
    result = train(cfg)
    ckpt = load_checkpoint(tmp_path / "run" / "segmentation_head.pth")
    assert ckpt.head_config.in_channels == 384 * layers and ckpt.head_config.name == head
    # training mIoU of the final head, measured here (train refuses the training cache as its
    # validation cache), against chance: always predicting the most frequent class
    trained = evaluate_on_cache(ckpt.build(), FeatureCache.open(cache), torch.device("cpu"), None)
    labels = FeatureCache.open(cache).load()[1][:, 0]
    counts = np.bincount(labels[labels != 255], minlength=11)
    majority_miou = counts.max() / labels[labels != 255].size / np.count_nonzero(counts)
    assert majority_miou < 0.06
    assert trained.miou > max(0.25, 4 * majority_miou), trained.miou
    assert result.history[-1]["train_loss"] < 0.6 * result.history[0]["train_loss"]


def test_checkpoint_is_self_contained(caches, tmp_path):
    train(train_config([caches["train"]], tmp_path / "run", val_cache=caches["val"]))
    ckpt = load_checkpoint(tmp_path / "run" / "segmentation_head.pth")
    spec = FeatureCache.open(caches["train"]).spec
    assert ckpt.backbone == spec.backbone and ckpt.preprocessing == spec.preprocessing
    assert ckpt.class_map == spec.class_map
    p = ckpt.payload
    assert p["train_config"]["epochs"] == 2 and p["metrics"]["val_miou"] is not None
    assert set(p["val_metrics"]["per_class"]) == set(ckpt.class_map.names)
    head = ckpt.build()
    again = build_head(ckpt.head_config)
    again.load_state_dict(
        torch.load(tmp_path / "run" / "segmentation_head.pth", weights_only=True)["state_dict"]
    )
    x = torch.randn(2, 384, 4, 7)
    torch.testing.assert_close(head(x), again.eval()(x), rtol=0, atol=0)
    stats = tmp_path / "run" / "train_stats"
    for name in ("history.csv", "history.json", "training_curves.png", "evaluation_metrics.txt"):
        assert (stats / name).stat().st_size > 0
    history = json.loads((stats / "history.json").read_text())["history"]
    assert [r["epoch"] for r in history] == [1, 2]
    csv_lines = (stats / "history.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,train_loss,val_loss,val_miou") and len(csv_lines) == 3
    text = (stats / "evaluation_metrics.txt").read_text()
    assert "Saved head (segmentation_head.pth): epoch" in text and "Per-epoch history" in text
    # the stats' final table is the best head's validation, computed afresh here
    weight = torch.tensor(p["class_weights"], dtype=torch.float32)
    fresh = evaluate_on_cache(head, FeatureCache.open(caches["val"]), torch.device("cpu"), weight)
    assert fresh.table("Best checkpoint on the validation cache") in text


def test_resume_reproduces_uninterrupted_run(caches, tmp_path):
    cfg = dict(epochs=3, val_cache=caches["val"])
    full = train(train_config([caches["train"]], tmp_path / "full", **cfg))

    import offroad_seg.training.loop as th

    # killed after epoch 3 was computed, before it was saved
    with (
        interrupted_in_epoch(3),
        pytest.raises(th.Interrupted, match="holds epoch 2 of 3.*--resume"),
    ):
        train(train_config([caches["train"]], tmp_path / "part", **cfg))
    assert load_checkpoint(tmp_path / "part" / "last.pth").payload["epoch"] == 2

    resumed = train(train_config([caches["train"]], tmp_path / "part", resume=True, **cfg))
    n3 = len(full.step_losses) // 3
    assert resumed.step_losses == full.step_losses[2 * n3 :]
    assert [r["val_miou"] for r in resumed.history] == [r["val_miou"] for r in full.history]
    a = load_checkpoint(tmp_path / "full" / "last.pth").payload["state_dict"]
    b = load_checkpoint(tmp_path / "part" / "last.pth").payload["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_streaming_matches_in_memory_samples(caches):
    cache = FeatureCache.open(caches["train"])
    feats, _ = cache.load()
    source = StreamingSource([cache], torch.device("cpu"), window=1)
    got = list(source.batches(seed=3, epoch=1, batch_size=4))
    f = torch.cat([b[0] for b in got])
    assert f.shape[0] == cache.num_images
    # each streamed sample is one cached view of one image, each image exactly once
    flat = torch.from_numpy(feats.astype(np.float32)).flatten(2)
    used = set()
    for row in f.flatten(1):
        hits = [
            (i, v) for i in range(flat.shape[0]) for v in range(2) if torch.equal(flat[i, v], row)
        ]
        assert len(hits) == 1
        used.add(hits[0][0])
    assert used == set(range(cache.num_images))
    again = torch.cat([b[0] for b in source.batches(seed=3, epoch=1, batch_size=4)])
    assert torch.equal(f, again)


def test_streaming_training_learns(caches, tmp_path):
    result = train(
        train_config(
            [caches["train"]], tmp_path / "s", stream=True, epochs=3, val_cache=caches["val"]
        )
    )
    assert result.source == "stream"
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_incompatible_caches_refused(caches, cache_4layers, tmp_path):
    # caches of other working sizes train together: tests/training/test_sizes.py
    with pytest.raises(
        CacheError, match="cannot be used with.*their features differ: layers 4 vs 1"
    ):
        train(train_config([caches["train"], cache_4layers], tmp_path / "a"))


def test_existing_results_and_resume_checks(caches, tmp_path):
    train(train_config([caches["train"]], tmp_path / "r", epochs=1))
    with pytest.raises(OffroadSegError, match="already holds a trained head"):
        train(train_config([caches["train"]], tmp_path / "r", epochs=1))
    with pytest.raises(CacheError, match="other caches"):
        train(train_config([caches["val"]], tmp_path / "r", epochs=1, resume=True))
    with pytest.raises(OffroadSegError, match="nothing to resume"):
        train(train_config([caches["train"]], tmp_path / "empty", resume=True))


def test_cli_train_prints_epochs(caches, tmp_path):
    r = CliRunner().invoke(
        cli,
        [
            "train",
            str(caches["train"]),
            str(tmp_path / "h"),
            "--val-cache",
            str(caches["val"]),
            "--epochs",
            "2",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "epoch   1/2" in r.stderr and "val_mIoU" in r.stderr
    assert "best val mIoU" in r.stdout
    assert (tmp_path / "h" / "segmentation_head.pth").exists()


def test_validation_metrics_equal_direct_computation(caches, tmp_path):
    train(train_config([caches["train"]], tmp_path / "v", epochs=1))
    ckpt = load_checkpoint(tmp_path / "v" / "segmentation_head.pth")
    head = ckpt.build()
    cache = FeatureCache.open(caches["val"])
    m1 = evaluate_on_cache(head, cache, torch.device("cpu"), None, batch_size=1)
    m3 = evaluate_on_cache(head, cache, torch.device("cpu"), None, batch_size=3)
    np.testing.assert_array_equal(m1.confusion, m3.confusion)
    assert m1.loss == pytest.approx(m3.loss, rel=1e-6)
    feats, labels = cache.load()
    with torch.no_grad():
        logits = head(torch.from_numpy(feats[:, 0].astype(np.float32)))
        up = torch.nn.functional.interpolate(
            logits, size=SIZE, mode="bilinear", align_corners=False
        )
    pred = up.argmax(1).numpy()
    assert m1.pixel_accuracy == pytest.approx(np.mean(pred == labels[:, 0]))


def test_stats_report_the_saved_epoch_only(tmp_path):
    # best mIoU at epoch 2, best Dice, accuracy and loss at epoch 3: every number under the
    # saved head's line is epoch 2's (#27 item 4)
    from offroad_seg.models.backbone import BackboneSpec
    from offroad_seg.training.run_folder import config_dict
    from offroad_seg.training.stats import stats_text

    def row(epoch, miou, dice, acc, loss):
        return dict(epoch=epoch, train_loss=1.0, val_loss=loss, val_miou=miou, val_dice=dice,
                    val_pixel_acc=acc, seconds=1.0)  # fmt: skip

    history = [row(1, 0.30, 0.40, 0.70, 0.90), row(2, 0.4096, 0.5191, 0.8101, 0.6123),
               row(3, 0.4001, 0.5200, 0.8202, 0.6001)]  # fmt: skip
    best = {k: v for k, v in history[1].items() if k.startswith("val_") or k == "epoch"}
    cfg = train_config([tmp_path / "train.zarr"], tmp_path / "run", epochs=3)
    run = {
        "settings": config_dict(cfg),
        "head": HeadConfig().to_dict(),
        "backbone": BackboneSpec("0" * 64, "random").to_dict(),
        "preprocessing": Preprocessing(size=SIZE).to_dict(),
        "train_caches": [{"path": str(tmp_path / "train.zarr")}],
        "val_cache": {"path": str(tmp_path / "val.zarr")},
    }
    text = stats_text(history, best, None, run)
    saved = text.split("Saved head (segmentation_head.pth): epoch 2, the best val mIoU\n")[1]
    block = saved.split("\n\n")[0].splitlines()
    assert block == [
        "  val mIoU: 0.4096",
        "  val Dice: 0.5191",
        "  val pixel accuracy: 0.8101",
        "  val loss: 0.6123",
    ]
    assert "0.5200" not in text.split("Per-epoch history")[0].split("Saved head")[1]
