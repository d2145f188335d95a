"""Tuning the last blocks from a block cache (`extract --block K`, `train --tune`): equal to
tuning online from the images, checkpoints that hold only what changed, LoRA merged for
inference, refusals in one line, and one end-to-end run from the CLI to ONNX Runtime."""

import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from offroad_seg.cli import cli
from offroad_seg.data.dataset import list_samples
from offroad_seg.data.images import read_image
from offroad_seg.errors import ConfigError, WeightsError
from offroad_seg.features.cache import FeatureCache
from offroad_seg.features.extract import extract
from offroad_seg.models.backbone import load_backbone, stored_tokens
from offroad_seg.models.checkpoint import load_checkpoint
from offroad_seg.models.heads import HeadConfig, build_head
from offroad_seg.models.lora import LoRALinear, merge_lora
from offroad_seg.models.preprocess import Preprocessing, image_to_tensor, resize_image
from offroad_seg.models.segmentation import SegmentationModel
from offroad_seg.models.tuning import TunedModel, TuneSpec
from offroad_seg.training.loop import TrainConfig, train
from offroad_seg.training.tuned import backbone_lr_scale
from tests.conftest import SIZE, extract_config, interrupted_in_epoch
from tests.training.online import online_losses

BLOCK = 10  # ViT-S has 12 blocks: the last two are tuned
GRID = Preprocessing(size=SIZE).grid


def train_config(cache, out, **kw) -> TrainConfig:
    defaults = dict(epochs=2, batch_size=2, progress=False, device="cpu", weights="random")
    return TrainConfig(caches=(cache,), out=out, **{**defaults, **kw})


@pytest.fixture(scope="module")
def block_cache(dataset, tmp_path_factory):
    path = tmp_path_factory.mktemp("block") / "train.zarr"
    config = extract_config(
        dataset / "train", path, views=("identity", "hflip"), dtype="float32", block=BLOCK
    )
    extract(config)
    return path


@pytest.fixture(scope="module")
def lora_run(block_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    return train(train_config(block_cache, out, tune="lora", epochs=1))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_tuning_from_a_block_cache_equals_tuning_online(
    mode, block_cache, dataset, backbone, tmp_path
):
    """The cache changes speed, never results: the same blocks, norm and head tuned online
    (image -> every block with gradients -> head, same seed and order) give the same losses and
    weights (3 steps: one of warmup, two of cosine decay)."""
    epochs, bs, seed = 1, 2, 5
    cfg = train_config(block_cache, tmp_path / "run", tune=mode, epochs=epochs, seed=seed)
    result = train(cfg)

    backbone = copy.deepcopy(backbone)
    torch.manual_seed(seed)
    head = build_head(HeadConfig(in_channels=384, num_classes=11))
    spec = TuneSpec(mode, BLOCK, 8 if mode == "lora" else 0, 16.0 if mode == "lora" else 0.0)
    model = TunedModel(backbone, head, spec, GRID)  # its parameters, grouped as train groups them

    def forward(x):  # the whole backbone from the image, no cache, no block split
        return head(backbone.features_from(backbone.tokens_entering(x, 0), 0, *GRID))

    scale = backbone_lr_scale(cfg)
    assert scale == (1.0 if mode == "lora" else 0.1)
    losses = online_losses(dataset / "train", SIZE, model, forward, seed, epochs, bs, 3e-4, scale)

    np.testing.assert_allclose(result.step_losses, losses, rtol=1e-5)
    ckpt = load_checkpoint(tmp_path / "run" / "segmentation_head.pth")
    saved, ours = ckpt.payload["state_dict"], model.state_dict()
    assert saved.keys() == ours.keys()
    for name, value in ours.items():
        torch.testing.assert_close(saved[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_lora_checkpoint_holds_adapters_norm_and_head_only(lora_run):
    ckpt = load_checkpoint(lora_run.out / "segmentation_head.pth")
    assert ckpt.tuning == TuneSpec("lora", BLOCK, 8, 16.0)
    assert ckpt.backbone.block == BLOCK
    state = ckpt.payload["state_dict"]
    tail = {k for k in state if not k.startswith("head.")}
    layers = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    expected = {
        f"blocks.{b}.{layer}.lora_{ab}" for b in range(2) for layer in layers for ab in "ab"
    } | {"norm.weight", "norm.bias"}
    assert tail == expected
    # rank 8: A is 8 x in, B is out x 8 (ViT-S: width 384, MLP 1536)
    assert state["blocks.0.mlp.fc1.lora_a"].shape == (8, 384)
    assert state["blocks.0.mlp.fc1.lora_b"].shape == (1536, 8)


def test_full_and_lora_train_the_counted_parameters(backbone):
    head = build_head(HeadConfig(name="linear", in_channels=384, num_classes=11))
    lora = TunedModel(copy.deepcopy(backbone), head, TuneSpec("lora", BLOCK, 4, 8.0), GRID)
    full = TunedModel(copy.deepcopy(backbone), head, TuneSpec("full", BLOCK), GRID)
    frozen = TunedModel(copy.deepcopy(backbone), head, TuneSpec("frozen", BLOCK), GRID)
    # per block, rank * (in + out) of qkv (384->1152), proj (384->384), fc1 (384->1536) and
    # fc2 (1536->384); the final norm's weight and bias
    per_block = 4 * ((384 + 1152) + (384 + 384) + (384 + 1536) + (1536 + 384))
    assert lora.parameter_counts()["backbone"] == 2 * per_block + 2 * 384
    blocks = sum(p.numel() for b in backbone.vit.blocks[BLOCK:] for p in b.parameters())
    assert full.parameter_counts()["backbone"] == blocks + 2 * 384
    assert frozen.parameter_counts()["backbone"] == 0


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov3_vits16"])
def test_merged_lora_equals_the_adapted_forward(name):
    """Inference runs the adapters merged into the weights (also what ONNX exports): the same
    features as the adapted blocks on the cached tokens (DINOv3: its masked qkv bias and RoPE).
    Layer scales of 0.5: timm's random 1e-5 would make every block (and adapter) invisible."""
    backbone = load_backbone("random", name=name)
    with torch.no_grad():
        for key, param in backbone.vit.named_parameters():
            if "gamma" in key:
                param.fill_(0.5)
    plain = copy.deepcopy(backbone)
    head = build_head(HeadConfig(name="linear", in_channels=384, num_classes=11))
    p = backbone.variant.patch_size
    model = TunedModel(backbone, head, TuneSpec("lora", 9, 4, 8.0), (3, 5))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.normal_(0.0, 0.5, generator=gen)
    x = torch.randn(2, 3, 3 * p, 5 * p, generator=gen)
    with torch.no_grad():
        adapted = model(stored_tokens(backbone.tokens_entering(x, 9)))
        plain_tail = head(plain(x))
        merge_lora(backbone.vit)
        merged = head(backbone(x))
    assert (adapted - plain_tail).abs().max() > 1e-2  # the adapters change the output
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


def test_tune_on_a_final_feature_cache_is_refused(caches, tmp_path):
    with pytest.raises(ConfigError, match="re-extract it with --block") as e:
        train(train_config(caches["train"], tmp_path / "run", tune="lora"))
    assert "\n" not in str(e.value) and str(caches["train"]) in str(e.value)


def test_other_weights_are_refused_for_cache_and_checkpoint(
    block_cache, lora_run, backbone, tmp_path
):
    vit = copy.deepcopy(backbone.vit)
    with torch.no_grad():
        vit.norm.weight.add_(1.0)
    weights = tmp_path / "other.pth"
    torch.save(vit.state_dict(), weights)
    with pytest.raises(WeightsError, match="extracted on other backbone weights") as e:
        train(train_config(block_cache, tmp_path / "run", tune="lora", weights=str(weights)))
    assert "\n" not in str(e.value)
    head = lora_run.out / "segmentation_head.pth"
    with pytest.raises(WeightsError, match="trained on other backbone weights") as e:
        SegmentationModel.from_checkpoint(head, str(weights), "cpu")
    assert "\n" not in str(e.value)


def test_tuned_checkpoint_predicts_what_its_blocks_compute_on_the_cache(
    lora_run, block_cache, dataset, backbone
):
    """Round trip: the saved model (LoRA merged, from the image) gives the logits the trained
    blocks give on the cached tokens (unmerged)."""
    ckpt = load_checkpoint(lora_run.out / "segmentation_head.pth")
    model = SegmentationModel.from_checkpoint(ckpt, None, "cpu")
    tuned = TunedModel(copy.deepcopy(backbone), ckpt.build(), ckpt.tuning, GRID).eval()
    tuned.load_state_dict(ckpt.payload["state_dict"])
    cached, _ = FeatureCache.open(block_cache).read_images(np.arange(2))
    sample = list_samples(dataset / "train")[:2]
    prep = Preprocessing(size=SIZE)
    images = torch.cat([resize_image(image_to_tensor(read_image(s.image)), prep) for s in sample])
    with torch.no_grad():
        expected = tuned(torch.from_numpy(cached[:, 0]))
    torch.testing.assert_close(model.logits(images), expected, rtol=1e-4, atol=1e-4)


def test_cache_info_names_the_block(block_cache):
    r = CliRunner().invoke(cli, ["cache", "info", str(block_cache), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["backbone"]["block"] == BLOCK
    assert info["features"]["shape"] == [6, 2, 384, 1, 1 + GRID[0] * GRID[1]]
    assert info["block"].startswith(f"tokens entering block {BLOCK} of 12")


def test_lora_tuned_vits_from_extract_to_onnx_runtime(dataset, tmp_path):
    """The one end-to-end run (slow): extract --block -> train --tune lora -> evaluate ->
    export -> predict with ONNX Runtime, on a ViT-S whose blocks matter (tests/inference/
    test_export.py's active random weights, in a file). The CLI's masks equal `Segmenter`'s;
    the ONNX model's (adapters merged into its weights) agree on >= 99.9% of the pixels."""
    from tests.inference.test_export import (
        active_vit,
        assert_cli_masks_match_segmenter_and_onnx,
        save_weights,
    )

    weights = save_weights(active_vit("dinov2_vits14", seed=3), tmp_path / "vits.safetensors")
    cache, run, val = tmp_path / "c.zarr", tmp_path / "run", dataset / "val"

    def ok(*args) -> str:
        r = CliRunner().invoke(cli, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return r.output

    ok("extract", dataset / "train", cache, "--weights", weights, "--block", BLOCK,
       "--size", f"{SIZE[0]}x{SIZE[1]}", "--workers", 0, "--dtype", "int8")  # fmt: skip
    ok("train", cache, run, "--tune", "lora", "--epochs", 1, "--device", "cpu", "--lr", 3e-3,
       "--checkpointing")  # fmt: skip
    head = run / "segmentation_head.pth"
    assert "tuned        LoRA rank 8, alpha 16 on blocks 10..11" in ok("info", head)
    ok("evaluate", head, val, tmp_path / "eval", "--workers", 0, "--comparisons", 0)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["backbone"]["block"] == BLOCK
    assert np.asarray(metrics["confusion_matrix"]).sum() == 3 * 112 * 196
    ok("export", head, tmp_path / "m.onnx")
    ok("predict", head, val, tmp_path / "t", "--workers", 0, "--device", "cpu")
    ok("predict", tmp_path / "m.onnx", val, tmp_path / "o", "--workers", 0)

    assert_cli_masks_match_segmenter_and_onnx(head, val, tmp_path / "t", tmp_path / "o")


def test_sweep_over_tuning_modes_ensembles_its_tuned_trials(block_cache, dataset, tmp_path):
    """`sweep --grid tune=lora,full --ensemble-top 2` on block caches: both trials tune their
    blocks, and the ensemble's val mIoU is that of the two trials' own tuned models (each on
    the cached tokens, as validation runs them) with their probabilities averaged."""
    from offroad_seg.training.tuned import cached_ensemble
    from offroad_seg.training.validation import evaluate_on_cache

    val = tmp_path / "val.zarr"
    extract(extract_config(dataset / "val", val, dtype="float32", block=BLOCK))
    out = tmp_path / "sweep"
    r = CliRunner().invoke(cli, [str(a) for a in (
        "sweep", block_cache, out, "--val-cache", val, "--epochs", 1, "--batch-size", 2,
        "--device", "cpu", "--weights", "random", "--grid", "tune=lora,full",
        "--ensemble-top", 2)])  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "ensemble.json").read_text())
    members = [load_checkpoint(out / "trials" / run) for run in summary["members"]]
    assert sorted(m.tuning.mode for m in members) == ["full", "lora"]

    class Mean(torch.nn.Module):  # the members' own tuned models, probabilities averaged
        def __init__(self):
            super().__init__()
            self.models = []
            for m in members:
                tuned = TunedModel(load_backbone("random"), m.build(), m.tuning, GRID).eval()
                tuned.load_state_dict(m.payload["state_dict"])
                self.models.append(tuned)

        def forward(self, x):
            return torch.stack([m(x).softmax(1) for m in self.models]).mean(0).log()

    mean, cache = Mean(), FeatureCache.open(val)
    expected = evaluate_on_cache(mean, cache, torch.device("cpu"), None)
    assert summary["val_miou"] == pytest.approx(expected.miou, abs=1e-9)
    tokens = torch.from_numpy(cache.read_images(np.arange(3))[0][:, 0])
    scored = cached_ensemble(members, cache, "random", torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(scored(tokens).exp(), mean(tokens).exp(), rtol=0, atol=1e-6)
    ens = load_checkpoint(out / "ensemble.pth")
    assert [t.mode for t in ens.member_tunings] == [m.tuning.mode for m in members]
    assert f"val mIoU {summary['val_miou']:.4f} (best single trial" in r.output


def test_interrupted_lora_tuning_resumes_to_the_uninterrupted_run(block_cache, tmp_path):
    """Killed after its last epoch was computed, before it was saved: --resume retrains that
    epoch to the same losses, adapters, norm and head as the run never interrupted (the
    adapters' optimizer state and RNG come back with them)."""
    import offroad_seg.training.loop as loop

    full = train(train_config(block_cache, tmp_path / "full", tune="lora"))
    with (
        interrupted_in_epoch(2),
        pytest.raises(loop.Interrupted, match="holds epoch 1 of 2.*--resume"),
    ):
        train(train_config(block_cache, tmp_path / "part", tune="lora"))
    resumed = train(train_config(block_cache, tmp_path / "part", tune="lora", resume=True))
    assert resumed.step_losses == full.step_losses[len(full.step_losses) // 2 :]
    a = load_checkpoint(tmp_path / "full" / "last.pth").payload["state_dict"]
    b = load_checkpoint(tmp_path / "part" / "last.pth").payload["state_dict"]
    assert any(k.endswith("lora_b") for k in a) and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_a_tuned_checkpoint_missing_an_adapter_is_one_line(lora_run, tmp_path):
    """A checkpoint whose tuned entries do not fit its backbone (an adapter dropped, the
    digest recomputed as an edit would) is refused in one line naming it, not a traceback."""
    from offroad_seg.errors import OffroadSegError
    from offroad_seg.models.checkpoint import save_checkpoint

    payload = dict(load_checkpoint(lora_run.out / "segmentation_head.pth").payload)
    state = dict(payload["state_dict"])
    del state[next(k for k in state if k.endswith("lora_b"))]
    bad = tmp_path / "bad.pth"
    save_checkpoint(bad, {**payload, "state_dict": state})
    with pytest.raises(OffroadSegError, match=r"bad.pth: its tuned blocks do not fit") as e:
        SegmentationModel.from_checkpoint(bad, None, "cpu")
    assert "\n" not in str(e.value) and "missing" in str(e.value)
