"""Backbones: every DINOv2 variant (DINOv3: test_dinov3.py), in every accepted weights format,
gives the official code's features. Checkpoints are written by the tests in the official layout
first (random weights), then converted to timm's layout by timm's own converter and to
transformers' layout by hand, so the loader meets each format as it exists in the wild."""

from __future__ import annotations

import dataclasses
import time

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import checkpoint_filter_fn

from offroad_seg.errors import WeightsError
from offroad_seg.models.backbone import (
    Backbone,
    BackboneSpec,
    create_vit,
    load_backbone,
    resize_pos_embed,
)
from offroad_seg.models.variants import BACKBONES, PLAIN_RESIZE, REGISTER_RESIZE, get_variant
from offroad_seg.models.weights import (
    find_weights,
    load_weights_into,
    read_state_dict,
    state_dict_sha256,
    to_timm_layout,
    weights_shape,
)
from tests.dinov2_reference import official_features

# Every variant is checked in every format with two blocks (the key mapping, the MLP and the
# prefix tokens are the same at any depth; ViT-g has 40 blocks and 1.1 B parameters), and the
# small and base variants also at full depth with `--layers 4`, the last four of twelve blocks.
TRUNCATED_DEPTH = 2
X = torch.randn(2, 3, 42, 70, generator=torch.Generator().manual_seed(0))  # a 3x5 token grid


def swiglu_hidden(dim: int) -> int:
    """The official SwiGLU width: 2/3 of 4 x dim, rounded up to a multiple of 8."""
    return (int(4 * dim * 2 / 3) + 7) // 8 * 8


def random_official_state_dict(variant, depth: int, seed: int) -> dict[str, torch.Tensor]:
    """Random weights in facebookresearch/dinov2's own layout (what *_pretrain.pth holds), with
    non-trivial layer scales and norms so that every block matters."""
    g = torch.Generator().manual_seed(seed)
    c = variant.embed_dim

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    def uniform(*shape, lo, hi):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    sd = {
        "cls_token": randn(1, 1, c, std=0.5),
        "pos_embed": randn(1, 1 + 37 * 37, c, std=0.5),
        "mask_token": torch.zeros(1, c),
        "patch_embed.proj.weight": randn(c, 3, 14, 14, std=(3 * 14 * 14) ** -0.5),
        "patch_embed.proj.bias": randn(c, std=0.1),
        "norm.weight": uniform(c, lo=0.5, hi=1.5),
        "norm.bias": randn(c, std=0.1),
    }
    if variant.registers:
        sd["register_tokens"] = randn(1, variant.registers, c, std=0.5)
    for i in range(depth):
        p = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            sd[p + f"{norm}.weight"] = uniform(c, lo=0.5, hi=1.5)
            sd[p + f"{norm}.bias"] = randn(c, std=0.1)
        sd[p + "attn.qkv.weight"] = randn(3 * c, c, std=c**-0.5)
        sd[p + "attn.qkv.bias"] = randn(3 * c, std=0.1)
        sd[p + "attn.proj.weight"] = randn(c, c, std=c**-0.5)
        sd[p + "attn.proj.bias"] = randn(c, std=0.1)
        if variant.ffn == "swiglu":
            hidden = swiglu_hidden(c)
            sd[p + "mlp.w12.weight"] = randn(2 * hidden, c, std=c**-0.5)
            sd[p + "mlp.w12.bias"] = randn(2 * hidden, std=0.1)
            sd[p + "mlp.w3.weight"] = randn(c, hidden, std=hidden**-0.5)
            sd[p + "mlp.w3.bias"] = randn(c, std=0.1)
        else:
            sd[p + "mlp.fc1.weight"] = randn(4 * c, c, std=c**-0.5)
            sd[p + "mlp.fc1.bias"] = randn(4 * c, std=0.1)
            sd[p + "mlp.fc2.weight"] = randn(c, 4 * c, std=(4 * c) ** -0.5)
            sd[p + "mlp.fc2.bias"] = randn(c, std=0.1)
        sd[p + "ls1.gamma"] = uniform(c, lo=0.1, hi=0.5)
        sd[p + "ls2.gamma"] = uniform(c, lo=0.1, hi=0.5)
    return sd


def transformers_state_dict(official: dict) -> dict[str, torch.Tensor]:
    """transformers' Dinov2Model / Dinov2WithRegistersModel layout (facebook/dinov2-*)."""
    sd = {
        "embeddings.cls_token": official["cls_token"],
        "embeddings.mask_token": official["mask_token"],
        "embeddings.position_embeddings": official["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": official["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": official["patch_embed.proj.bias"],
        "layernorm.weight": official["norm.weight"],
        "layernorm.bias": official["norm.bias"],
    }
    if "register_tokens" in official:
        sd["embeddings.register_tokens"] = official["register_tokens"]
    depth = 1 + max(int(k.split(".")[1]) for k in official if k.startswith("blocks."))
    for i in range(depth):
        b, e = f"blocks.{i}.", f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            q, k, v = official[b + f"attn.qkv.{p}"].chunk(3)
            sd[e + f"attention.attention.query.{p}"] = q
            sd[e + f"attention.attention.key.{p}"] = k
            sd[e + f"attention.attention.value.{p}"] = v
            sd[e + f"attention.output.dense.{p}"] = official[b + f"attn.proj.{p}"]
            for n in ("norm1", "norm2"):
                sd[e + f"{n}.{p}"] = official[b + f"{n}.{p}"]
            if b + "mlp.w12.weight" in official:
                sd[e + f"mlp.weights_in.{p}"] = official[b + f"mlp.w12.{p}"]
                sd[e + f"mlp.weights_out.{p}"] = official[b + f"mlp.w3.{p}"]
            else:
                sd[e + f"mlp.fc1.{p}"] = official[b + f"mlp.fc1.{p}"]
                sd[e + f"mlp.fc2.{p}"] = official[b + f"mlp.fc2.{p}"]
        sd[e + "layer_scale1.lambda1"] = official[b + "ls1.gamma"]
        sd[e + "layer_scale2.lambda1"] = official[b + "ls2.gamma"]
    return {k: v.contiguous() for k, v in sd.items()}


def write_checkpoints(tmp_path, variant, depth: int, seed: int = 1) -> tuple[dict, dict]:
    """The same random weights as an official .pth, a timm .safetensors (converted by timm's
    own checkpoint filter) and a transformers .safetensors."""
    official = random_official_state_dict(variant, depth, seed)
    paths = {"official": tmp_path / variant.official_file}
    torch.save(official, paths["official"])
    timm_sd = checkpoint_filter_fn(dict(official), create_vit(variant, depth=depth))
    paths["timm"] = tmp_path / f"{variant.name}-timm.safetensors"
    save_file({k: v.contiguous() for k, v in timm_sd.items()}, paths["timm"])
    paths["transformers"] = tmp_path / f"{variant.name}-hf.safetensors"
    save_file(transformers_state_dict(official), paths["transformers"])
    return official, paths


def build(path, variant, depth: int) -> Backbone:
    """What load_backbone does, at a chosen depth (load_backbone always builds the full depth;
    it runs end to end at full depth below)."""
    with torch.device("meta"):
        vit = create_vit(variant, depth=depth)
    load_weights_into(vit, read_state_dict(path), str(path), variant)
    spec = BackboneSpec(state_dict_sha256(vit.state_dict()), str(path), depth, variant.name)
    return Backbone(vit, spec)


def with_layers(backbone: Backbone, layers: int) -> Backbone:
    return Backbone(backbone.vit, dataclasses.replace(backbone.spec, layers=layers))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


DINOV2 = [name for name, v in BACKBONES.items() if v.family == "dinov2"]  # DINOv3: test_dinov3


@pytest.mark.parametrize("name", DINOV2)
def test_every_variant_in_every_format_equals_the_official_code(tmp_path, name):
    variant = get_variant(name)
    # the giants at one block (a ViT-g block is 30 M values per format); layers concatenated
    # across blocks are checked on the others
    depth = 1 if variant.embed_dim >= 1536 else TRUNCATED_DEPTH
    official, paths = write_checkpoints(tmp_path, variant, depth)
    ref = official_features(official, X, depth, variant.num_heads)  # every block, normed
    hashes = set()
    for fmt, path in paths.items():
        backbone = build(path, variant, depth)
        hashes.add(backbone.spec.weights_sha256)
        for layers in sorted({1, depth}):
            ours = with_layers(backbone, layers)(X)
            assert ours.shape == (2, layers * variant.embed_dim, 3, 5), fmt
            expected = ref[:, -layers * variant.embed_dim :]
            assert relative_error(ours, expected) < 2e-5, (fmt, layers)
    assert len(hashes) == 1  # the same weights in any format are the same backbone


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vitb14_reg"])
def test_full_depth_last_four_layers_equal_the_official_code(tmp_path, name):
    """load_backbone end to end on a full-depth official checkpoint: `--layers 4` is the
    official get_intermediate_layers(n=4, norm=True), `--layers 1` its x_norm_patchtokens."""
    variant = get_variant(name)
    official = random_official_state_dict(variant, variant.depth, seed=2)
    torch.save(official, tmp_path / variant.official_file)
    backbone = load_backbone(str(tmp_path / variant.official_file), layers=4, name=name)
    ref = official_features(official, X, 4, variant.num_heads)
    assert relative_error(backbone(X), ref) < 2e-5
    ref1 = official_features(official, X, 1, variant.num_heads)
    torch.testing.assert_close(ref[:, -variant.embed_dim :], ref1, rtol=0, atol=0)
    assert relative_error(with_layers(backbone, 1)(X), ref1) < 2e-5


def test_pretraining_grid_uses_the_embeddings_as_they_are(tmp_path):
    variant = get_variant("dinov2_vits14_reg")
    official = random_official_state_dict(variant, 1, seed=3)
    torch.save(official, tmp_path / "s.pth")
    x = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(3))
    ours = build(tmp_path / "s.pth", variant, depth=1)(x)
    ref = official_features(official, x, 1, variant.num_heads)
    assert relative_error(ours, ref) < 2e-5


def test_full_size_key_mapping_on_the_meta_device():
    """ViT-L and ViT-g at full depth: the official layout of every tensor converts to exactly
    timm's keys and shapes, and the variant is recognised from them."""
    for name in ("dinov2_vitl14", "dinov2_vitg14", "dinov2_vitl14_reg", "dinov2_vitg14_reg"):
        variant = get_variant(name)
        with torch.device("meta"):
            vit = create_vit(variant)
            official = random_official_state_dict(variant, variant.depth, seed=0)
        converted = to_timm_layout(official)
        own = vit.state_dict()
        assert set(converted) == set(own), name
        assert all(converted[k].shape == own[k].shape for k in own), name
        shape = weights_shape(converted)
        assert (shape.depth, shape.registers, shape.ffn) == (
            variant.depth,
            variant.registers,
            variant.ffn,
        )
        params = sum(p.numel() for p in vit.parameters()) / 1e6
        assert abs(params - variant.params_m) < 0.01  # as `offroad-seg backbones` lists it


def test_position_embeddings_are_resized_as_each_variant_does():
    pe = torch.randn(1, 37 * 37, 32)
    grid = pe.reshape(1, 37, 37, 32).permute(0, 3, 1, 2)
    plain = F.interpolate(grid, scale_factor=(19.1 / 37, 34.1 / 37), mode="bicubic")
    registers = F.interpolate(grid, size=(19, 34), mode="bicubic", antialias=True)
    for how, ref in ((PLAIN_RESIZE, plain), (REGISTER_RESIZE, registers)):
        ours = resize_pos_embed(pe, 19, 34, how)
        torch.testing.assert_close(ours, ref.permute(0, 2, 3, 1).reshape(1, 19 * 34, 32))
    assert (plain - registers).abs().max() > 1e-2  # the two rules really differ
    # timm's own default resize differs from both: the reason the forward pass is ours
    from timm.layers import resample_abs_pos_embed

    timm_pe = resample_abs_pos_embed(pe, new_size=(19, 34), num_prefix_tokens=0)
    assert (timm_pe - plain.permute(0, 2, 3, 1).reshape(1, -1, 32)).abs().max() > 1e-3
    assert torch.equal(resize_pos_embed(pe, 37, 37, PLAIN_RESIZE), pe)


def test_weights_of_another_variant_are_refused_naming_both(tmp_path):
    vitb = random_official_state_dict(get_variant("dinov2_vitb14"), 1, seed=0)
    torch.save(vitb, tmp_path / "b.pth")
    with pytest.raises(WeightsError, match=r"b.pth: weights of dinov2_vitb14, not dinov2_vits14"):
        load_backbone(str(tmp_path / "b.pth"))
    vits_reg = random_official_state_dict(get_variant("dinov2_vits14_reg"), 1, seed=0)
    torch.save(vits_reg, tmp_path / "sreg.pth")
    with pytest.raises(WeightsError, match=r"weights of dinov2_vits14_reg, not dinov2_vits14;"):
        load_backbone(str(tmp_path / "sreg.pth"))
    with pytest.raises(WeightsError, match=r"weights of dinov2_vits14, not dinov2_vits14_reg"):
        vits = random_official_state_dict(get_variant("dinov2_vits14"), 1, seed=0)
        torch.save(vits, tmp_path / "s.pth")
        load_backbone(str(tmp_path / "s.pth"), name="dinov2_vits14_reg")
    # a checkpoint of the right variant with blocks missing
    with pytest.raises(WeightsError, match=r"sreg.pth: not a dinov2_vits14_reg checkpoint"):
        load_backbone(str(tmp_path / "sreg.pth"), name="dinov2_vits14_reg")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"junk.pth: not a weights file \(unrecognised content"):
        load_backbone(str(tmp_path / "junk.pth"))


def test_random_weights_are_reproducible(backbone):
    again = load_backbone("random")
    assert again.spec.weights_sha256 == backbone.spec.weights_sha256
    assert again.spec.weights_source == "random"
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not backbone.vit.training


def test_spec_reads_caches_written_before_the_registry():
    old = {
        "weights_sha256": "ab" * 32,
        "weights_source": "random",
        "layers": 4,
        "arch": "vit_small_patch14_dinov2",
        "embed_dim": 384,
        "channels": 1536,
    }
    spec = BackboneSpec.from_dict(old)
    assert spec.name == "dinov2_vits14" and spec.channels == 1536
    # the identity (hashed into cache fingerprints) is what it was
    assert spec.identity() == {"arch": old["arch"], "weights_sha256": "ab" * 32, "layers": 4}
    assert BackboneSpec.from_dict(spec.to_dict()) == spec


def hf_cache_file(root, repo: str, tensors: dict) -> object:
    """A file in the Hugging Face cache layout: models--ORG--NAME/{refs/main, snapshots/REV/}."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    snap = folder / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, snap / "model.safetensors")
    return snap / "model.safetensors"


@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    monkeypatch.delenv("OFFROAD_SEG_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hfc

    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    return tmp_path


def test_backbones_marks_the_weights_found_locally(offline_caches, monkeypatch):
    from click.testing import CliRunner

    from offroad_seg.cli import cli

    root = offline_caches
    hub = root / "torch" / "hub" / "checkpoints" / get_variant("dinov2_vitb14").official_file
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"")
    hf = hf_cache_file(root / "hf", get_variant("dinov3_vits16").transformers_repo, {})
    monkeypatch.setenv("OFFROAD_SEG_WEIGHTS", str(root / "mine.pth"))
    r = CliRunner().invoke(cli, ["backbones"])
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: line.split() for line in r.output.splitlines()[1:]}
    assert r.output.splitlines()[0].split()[8] == "local"
    local = {name for name in BACKBONES if rows[name][8] == "yes"}
    assert local == {"dinov2_vitb14", "dinov3_vits16"}
    assert all(rows[name][8] == "-" for name in set(BACKBONES) - local)
    assert f"local dinov2_vitb14: {hub}" in r.output
    assert f"local dinov3_vits16: {hf}" in r.output
    assert f"$OFFROAD_SEG_WEIGHTS={root / 'mine.pth'} is used in place of" in r.output


def test_weights_resolution_order(offline_caches):
    root = offline_caches
    variant = get_variant("dinov2_vitb14_reg")
    with pytest.raises(WeightsError, match="no dinov2_vitb14_reg weights found.*--weights"):
        find_weights("auto", variant)
    tensors = {"x": torch.zeros(1)}
    hf = hf_cache_file(root / "hf", variant.transformers_repo, tensors)
    assert find_weights("auto", variant) == str(hf)
    timm_file = hf_cache_file(root / "hf", variant.timm_repo, tensors)
    assert find_weights("auto", variant) == str(timm_file)  # timm's repository first
    # another variant's cached files are not this one's
    with pytest.raises(WeightsError, match="no dinov2_vitb14 weights"):
        find_weights("auto", get_variant("dinov2_vitb14"))
    hub = root / "torch" / "hub" / "checkpoints" / "dinov2_vitb14_reg4_pretrain.pth"
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"")
    assert find_weights(None, variant) == str(hub)
    env = root / "env.pth"
    env.write_bytes(b"")
    import os

    os.environ["OFFROAD_SEG_WEIGHTS"] = str(env)
    try:
        assert find_weights("auto", variant) == str(env)
        explicit = root / "explicit.safetensors"
        explicit.write_bytes(b"")
        assert find_weights(str(explicit), variant) == str(explicit)
        assert find_weights("random", variant) == "random"
        with pytest.raises(WeightsError, match="nope.pth: weights file not found"):
            find_weights(str(root / "nope.pth"), variant)
        os.environ["OFFROAD_SEG_WEIGHTS"] = str(root / "gone.pth")
        with pytest.raises(WeightsError, match=r"gone.pth \(from \$OFFROAD_SEG_WEIGHTS\)"):
            find_weights("auto", variant)
    finally:
        del os.environ["OFFROAD_SEG_WEIGHTS"]


def test_offline_machine_fails_fast_without_the_hub_client(offline_caches, monkeypatch):
    """Offline, the hub client retries for ~25 s; a refused connection must end it at once."""
    import socket

    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")

    def no_network(address, timeout=None):
        no_network.calls.append((address, timeout))
        raise OSError("Name or service not known")

    no_network.calls = []
    monkeypatch.setattr(socket, "create_connection", no_network)

    def never(*a, **k):
        raise AssertionError("the hub client must not be called offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", never)
    started = time.perf_counter()
    with pytest.raises(WeightsError, match="no dinov2_vits14 weights found"):
        find_weights("auto", get_variant("dinov2_vits14"))
    assert time.perf_counter() - started < 1.0
    assert no_network.calls == [(("huggingface.co", 443), 3.0)]
    # behind a proxy, the proxy is what must answer
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    with pytest.raises(WeightsError):
        find_weights("auto", get_variant("dinov2_vits14"))
    assert no_network.calls[-1] == (("proxy.internal", 3128), 3.0)


def test_timm_architecture_matches_the_registry():
    for variant in BACKBONES.values():
        with torch.device("meta"):
            vit = timm.create_model(variant.timm_arch, pretrained=False, num_classes=0)
        assert vit.embed_dim == variant.embed_dim
        assert len(vit.blocks) == variant.depth
        assert vit.num_prefix_tokens == variant.prefix_tokens
        assert vit.blocks[0].attn.num_heads == variant.num_heads
