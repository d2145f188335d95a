"""Ensembles whose members tuned the backbone's last blocks (`train --tune`): the backbone runs
once up to the earliest tuned block, each tuned member then runs its own blocks, and the
members' probabilities are averaged, in torch and in one ONNX graph, from the CLI and the API.
Members: a plain head, a LoRA-tuned one from block 10 and a fully tuned one from block 11, on
an "active" random ViT-S (tests/inference/test_export.py), their tuned weights moved away from
the pretrained ones as training would."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from offroad_seg.cli import cli
from offroad_seg.data.classes import ClassMap
from offroad_seg.inference.engines import LOGIT_TOLERANCE, OnnxEngine
from offroad_seg.inference.onnx_model import checkpoint_from_onnx
from offroad_seg.models.backbone import load_backbone
from offroad_seg.models.checkpoint import head_payload, save_checkpoint
from offroad_seg.models.heads import HeadConfig, build_head
from offroad_seg.models.preprocess import Preprocessing
from offroad_seg.models.segmentation import TTA, SegmentationModel
from offroad_seg.models.tuning import TunedModel, TuneSpec
from tests.conftest import SIZE
from tests.inference.test_export import (
    AGREEMENT,
    active_vit,
    agreement,
    assert_cli_masks_match_segmenter_and_onnx,
    relative_error,
    save_weights,
    upsample,
)

GRID = Preprocessing(size=SIZE).grid
MEMBERS = {  # name: (tuning, head, seed)
    "plain": (None, "linear", 1),
    "lora": (TuneSpec("lora", 10, rank=4, alpha=8.0), "upnext", 2),
    "full": (TuneSpec("full", 11), "linear", 3),
}


def tuned_member(
    path,
    weights: str,
    spec: TuneSpec | None,
    head: str,
    seed: int,
    name: str = "dinov2_vits14",
    size: tuple[int, int] = SIZE,
):
    """A head checkpoint as `train --tune` writes one, its adapters or blocks and its norm
    moved off the pretrained values (a random step of about the size training takes)."""
    backbone = load_backbone(weights, name=name)
    prep = Preprocessing(size=size, patch_size=backbone.variant.patch_size)
    cfg = HeadConfig(name=head, in_channels=backbone.spec.channels)
    torch.manual_seed(seed)
    module = build_head(cfg)
    if spec is None:
        state, extra, bb = module.state_dict(), {}, backbone.spec
    else:
        model = TunedModel(backbone, module, spec, prep.grid)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and not name.startswith("head."):
                    p.add_(torch.randn_like(p) * 0.05)
        state, extra = model.state_dict(), {"tuning": spec.to_dict()}
        bb = replace(backbone.spec, block=spec.block)
    payload = head_payload(cfg, ClassMap.default(), bb, prep, state_dict=state, **extra)
    save_checkpoint(path, payload)
    return path


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuned-ensemble")
    weights = save_weights(active_vit("dinov2_vits14", seed=3), root / "vits.safetensors")
    paths = {n: tuned_member(root / f"{n}.pth", weights, *m) for n, m in MEMBERS.items()}
    out = root / "ensemble.pth"
    r = CliRunner().invoke(cli, ["ensemble", *map(str, paths.values()), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert (
        "an ensemble of 3 heads (linear, upnext, linear) on dinov2_vits14 at 56x98; 2 tuned "
        "their blocks: the backbone runs once up to block 10, then 3 branches"
    ) in r.output
    return {**paths, "ensemble": out, "root": root}


def test_probabilities_are_the_mean_of_each_members_own_model(members, images):
    """Each member computed alone (its own backbone with its blocks merged in) vs the
    ensemble, which runs blocks 0..9 once and three tails from block 10."""
    model = SegmentationModel.from_checkpoint(members["ensemble"], None, "cpu")
    alone = [
        SegmentationModel.from_checkpoint(members[n], None, "cpu").logits(images) for n in MEMBERS
    ]
    rows, cols = max(z.shape[-2] for z in alone), max(z.shape[-1] for z in alone)
    probs = [
        F.interpolate(z, size=(rows, cols), mode="bilinear", align_corners=False).softmax(1)
        for z in alone
    ]
    expected = torch.stack(probs).mean(0)
    calls = {"block 0": 0}
    hook = model.backbone.vit.blocks[0].register_forward_hook(
        lambda *_: calls.__setitem__("block 0", calls["block 0"] + 1)
    )
    got = model.logits(images)
    hook.remove()
    assert got.shape == expected.shape == (3, 11, GRID[0] * 4, GRID[1] * 4)
    torch.testing.assert_close(got.softmax(1), expected, rtol=0, atol=1e-6)
    assert calls == {"block 0": 1}  # the shared blocks ran once for the three members
    tails = model.backbone.tails
    assert [t.start for t in tails] == [10, 10, 10]
    own = model.backbone.vit.blocks
    assert tails[0].blocks[0] is own[10] and tails[0].norm is model.backbone.vit.norm  # shared
    assert tails[2].blocks[0] is own[10] and tails[2].blocks[1] is not own[11]  # full from 11
    # every member matters: the tuned blocks changed the members' own outputs
    for p in probs:
        assert (p - expected).abs().max() > 1e-2


def test_cli_info_names_each_members_tuning(members):
    r = CliRunner().invoke(cli, ["info", str(members["ensemble"])])
    assert r.exit_code == 0, r.output
    assert "ensemble     3 heads, probabilities averaged" in r.output
    assert "  member 0   linear (dropout 0); from " in r.output
    assert "; LoRA rank 4, alpha 8 on blocks 10..11 + final norm; from " in r.output
    assert "  member 2   linear (dropout 0); block 11 + final norm fully tuned; from" in (r.output)
    info = json.loads(CliRunner().invoke(cli, ["info", str(members["ensemble"]), "--json"]).output)
    assert [m["tuning"] and m["tuning"]["mode"] for m in info["ensemble"]] == [None, "lora", "full"]
    assert info["backbone"]["block"] is None  # an ensemble maps images to logits


def test_cli_predict_segmenter_and_onnx_runtime_agree(members, images, dataset, tmp_path):
    """The CLI's masks equal `Segmenter`'s; the exported graph (every tail in it, LoRA merged)
    computes the torch logits, and its masks agree on >= 99.9% of the pixels."""
    ens, val = members["ensemble"], dataset / "val"
    onnx_path = members["root"] / "ensemble.onnx"
    for args in (
        ["export", ens, onnx_path, "--batch", "dynamic"],
        ["predict", ens, val, tmp_path / "t", "--workers", 0, "--device", "cpu"],
        ["predict", onnx_path, val, tmp_path / "o", "--workers", 0],
    ):
        r = CliRunner().invoke(cli, [str(a) for a in args])
        assert r.exit_code == 0, r.output
    meta = checkpoint_from_onnx(onnx_path)
    assert [c.name for c in meta.members] == ["linear", "upnext", "linear"]
    assert meta.payload["member_tuning"] == [
        None if m[0] is None else m[0].to_dict() for m in MEMBERS.values()
    ]
    assert_cli_masks_match_segmenter_and_onnx(ens, val, tmp_path / "t", tmp_path / "o")
    model = SegmentationModel.from_checkpoint(ens, None, "cpu")
    expected, got = model.logits(images), OnnxEngine(onnx_path).logits(images)
    assert relative_error(expected, got) < LOGIT_TOLERANCE
    assert agreement(upsample(expected).argmax(1), upsample(got).argmax(1)) >= AGREEMENT


def test_dinov3_members_at_two_tta_sizes(tmp_path):
    """DINOv3 (rotary embeddings computed per grid, masked key bias) at the working size and
    at 1.5x, as multi-scale TTA runs it: each branch's logits are the member's own."""
    prep = Preprocessing(size=(64, 112), patch_size=16)
    paths = [
        tuned_member(tmp_path / f"{n}.pth", "random", spec, "linear", seed, "dinov3_vits16",
                     prep.size)
        for n, (spec, _, seed) in MEMBERS.items()
    ]  # fmt: skip
    ens = tmp_path / "e.pth"
    assert CliRunner().invoke(cli, ["ensemble", *map(str, paths), "-o", str(ens)]).exit_code == 0
    tta = TTA.of("none", (1.0, 1.5))
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, *prep.size), dtype=torch.uint8, generator=gen)
    (big,) = tta.extra_sizes(prep)
    scaled = [torch.randint(0, 256, (2, 3, *big), dtype=torch.uint8, generator=gen)]
    got = SegmentationModel.from_checkpoint(ens, "random", "cpu").tta_logits(images, scaled, tta)
    alone = [
        SegmentationModel.from_checkpoint(p, "random", "cpu").tta_logits(images, scaled, tta)
        for p in paths
    ]
    assert [g.shape[-2:] for g in got] == [(4, 7), (6, 10)]
    for k, logits in enumerate(got):
        expected = torch.stack([a[k].softmax(1) for a in alone]).mean(0)
        torch.testing.assert_close(logits.softmax(1), expected, rtol=0, atol=1e-6)
