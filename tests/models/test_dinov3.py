"""DINOv3 backbones: every registered variant, in the official, timm and transformers weights
layouts, gives the official code's features (tests/dinov3_reference.py, written from
facebookresearch/dinov3); the CLI extracts with the official file; a DINOv3 cache goes through
train -> evaluate -> export -> onnxruntime predict.

Checkpoints are written by the tests in the official layout first (random weights, with the
key bias and its mask, SwiGLU as w1/w2/w3, the RoPE periods as the official code computes them),
then converted to timm's layout by timm's own converter and to transformers' by hand, as
transformers' conversion script does, so the loader meets each format as it exists in the wild.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from timm.models.eva import checkpoint_filter_fn

from offroad_seg.cli import cli
from offroad_seg.data.dataset import list_samples
from offroad_seg.data.images import read_image, read_mask
from offroad_seg.errors import WeightsError
from offroad_seg.features.cache import FeatureCache
from offroad_seg.models.backbone import Backbone, BackboneSpec, create_vit, load_backbone
from offroad_seg.models.preprocess import image_to_tensor, preprocess
from offroad_seg.models.variants import BACKBONES, get_variant
from offroad_seg.models.weights import (
    load_weights_into,
    read_state_dict,
    state_dict_sha256,
    to_timm_layout,
    weights_shape,
)
from tests.dinov3_reference import official_features, official_rope_periods

DINOV3 = [name for name, v in BACKBONES.items() if v.family == "dinov3"]
X = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(0))  # a 3x5 token grid

# What facebookresearch/dinov3's hub/backbones.py passes per variant: ffn_ratio, ffn_layer
# (SwiGLU's alignment: swiglu 8, swiglu64 64), qkv_bias, and the dtype the training config
# computed the RoPE periods in (ssl_default_config / the distilled ViT-L config: bf16; the 7B's
# configs: fp32)
OFFICIAL = {
    "dinov3_vits16": dict(ratio=4, swiglu=0, qkv_bias=True, rope=torch.bfloat16),
    "dinov3_vits16plus": dict(ratio=6, swiglu=8, qkv_bias=True, rope=torch.bfloat16),
    "dinov3_vitb16": dict(ratio=4, swiglu=0, qkv_bias=True, rope=torch.bfloat16),
    "dinov3_vitl16": dict(ratio=4, swiglu=0, qkv_bias=True, rope=torch.bfloat16),
    "dinov3_vith16plus": dict(ratio=6, swiglu=8, qkv_bias=True, rope=torch.bfloat16),
    "dinov3_vit7b16": dict(ratio=3, swiglu=64, qkv_bias=False, rope=torch.float32),
}
# Blocks per check: the key mapping, the MLP and the tokens are the same at any depth; the 7B's
# one block holds 168 M parameters (0.7 GB in float32 per copy), so it is checked at depth 1
DEPTH = {name: 1 if name == "dinov3_vit7b16" else 2 for name in DINOV3}


def hidden_width(name: str, dim: int) -> int:
    """The official FFN width: int(dim * ratio); SwiGLUFFN takes 2/3 of it, rounded up to its
    alignment."""
    o = OFFICIAL[name]
    hidden = int(dim * o["ratio"])
    if not o["swiglu"]:
        return hidden
    d = int(hidden * 2 / 3)
    return d + (-d % o["swiglu"])


def random_official_state_dict(name: str, depth: int, seed: int) -> dict[str, torch.Tensor]:
    """Random weights in facebookresearch/dinov3's layout (what *_pretrain_lvd1689m-*.pth
    holds), with non-trivial layer scales, norms and biases (the key bias too: the mask must
    remove it) so that every part matters."""
    variant, o = get_variant(name), OFFICIAL[name]
    g = torch.Generator().manual_seed(seed)
    c, heads = variant.embed_dim, variant.num_heads

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    def uniform(*shape, lo, hi):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    sd = {
        "cls_token": randn(1, 1, c, std=0.5),
        "storage_tokens": randn(1, 4, c, std=0.5),
        "mask_token": torch.zeros(1, c),
        "rope_embed.periods": official_rope_periods(c // heads, o["rope"]),
        "patch_embed.proj.weight": randn(c, 3, 16, 16, std=(3 * 16 * 16) ** -0.5),
        "patch_embed.proj.bias": randn(c, std=0.1),
        "norm.weight": uniform(c, lo=0.5, hi=1.5),
        "norm.bias": randn(c, std=0.1),
    }
    if name == "dinov3_vit7b16":  # untie_global_and_local_cls_norm: a training-only norm
        sd["local_cls_norm.weight"], sd["local_cls_norm.bias"] = randn(c), randn(c)
    hidden = hidden_width(name, c)
    for i in range(depth):
        p = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            sd[p + f"{norm}.weight"] = uniform(c, lo=0.5, hi=1.5)
            sd[p + f"{norm}.bias"] = randn(c, std=0.1)
        sd[p + "attn.qkv.weight"] = randn(3 * c, c, std=2 * c**-0.5)
        if o["qkv_bias"]:
            sd[p + "attn.qkv.bias"] = randn(3 * c, std=0.3)
            mask = torch.ones(3 * c)
            mask[c : 2 * c] = 0
            sd[p + "attn.qkv.bias_mask"] = mask
        sd[p + "attn.proj.weight"] = randn(c, c, std=c**-0.5)
        sd[p + "attn.proj.bias"] = randn(c, std=0.1)
        if o["swiglu"]:
            for w in ("w1", "w2"):
                sd[p + f"mlp.{w}.weight"] = randn(hidden, c, std=c**-0.5)
                sd[p + f"mlp.{w}.bias"] = randn(hidden, std=0.1)
            sd[p + "mlp.w3.weight"] = randn(c, hidden, std=hidden**-0.5)
            sd[p + "mlp.w3.bias"] = randn(c, std=0.1)
        else:
            sd[p + "mlp.fc1.weight"] = randn(hidden, c, std=c**-0.5)
            sd[p + "mlp.fc1.bias"] = randn(hidden, std=0.1)
            sd[p + "mlp.fc2.weight"] = randn(c, hidden, std=hidden**-0.5)
            sd[p + "mlp.fc2.bias"] = randn(c, std=0.1)
        sd[p + "ls1.gamma"] = uniform(c, lo=0.1, hi=0.5)
        sd[p + "ls2.gamma"] = uniform(c, lo=0.1, hi=0.5)
    return sd


def transformers_state_dict(official: dict) -> dict[str, torch.Tensor]:
    """transformers' DINOv3ViTModel layout (facebook/dinov3-*-pretrain-lvd1689m): q, k, v
    split, the masked key bias left out (as transformers' conversion script does), SwiGLU as
    gate/up/down projections, no RoPE buffer (transformers computes its own)."""
    sd = {
        "embeddings.cls_token": official["cls_token"],
        "embeddings.mask_token": official["mask_token"][None],
        "embeddings.register_tokens": official["storage_tokens"],
        "embeddings.patch_embeddings.weight": official["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.bias": official["patch_embed.proj.bias"],
        "norm.weight": official["norm.weight"],
        "norm.bias": official["norm.bias"],
    }
    depth = 1 + max(int(k.split(".")[1]) for k in official if k.startswith("blocks."))
    for i in range(depth):
        b, e = f"blocks.{i}.", f"layer.{i}."
        for p in ("weight", "bias"):
            if b + f"attn.qkv.{p}" in official:
                q, k, v = official[b + f"attn.qkv.{p}"].chunk(3)
                sd[e + f"attention.q_proj.{p}"] = q
                if p == "weight":
                    sd[e + f"attention.k_proj.{p}"] = k
                sd[e + f"attention.v_proj.{p}"] = v
            sd[e + f"attention.o_proj.{p}"] = official[b + f"attn.proj.{p}"]
            for n in ("norm1", "norm2"):
                sd[e + f"{n}.{p}"] = official[b + f"{n}.{p}"]
            if b + "mlp.w1.weight" in official:
                sd[e + f"mlp.gate_proj.{p}"] = official[b + f"mlp.w1.{p}"]
                sd[e + f"mlp.up_proj.{p}"] = official[b + f"mlp.w2.{p}"]
                sd[e + f"mlp.down_proj.{p}"] = official[b + f"mlp.w3.{p}"]
            else:
                sd[e + f"mlp.up_proj.{p}"] = official[b + f"mlp.fc1.{p}"]
                sd[e + f"mlp.down_proj.{p}"] = official[b + f"mlp.fc2.{p}"]
        sd[e + "layer_scale1.lambda1"] = official[b + "ls1.gamma"]
        sd[e + "layer_scale2.lambda1"] = official[b + "ls2.gamma"]
    return {k: v.contiguous() for k, v in sd.items()}


def write_checkpoints(tmp_path, name: str, depth: int, seed: int = 1) -> tuple[dict, dict]:
    """The same random weights as the official .pth, a timm .safetensors (converted by timm's
    own checkpoint filter) and a transformers .safetensors."""
    variant = get_variant(name)
    official = random_official_state_dict(name, depth, seed)
    paths = {"official": tmp_path / variant.official_file}
    torch.save(official, paths["official"])
    with torch.device("meta"):
        model = create_vit(variant, depth=depth)
    timm_sd = checkpoint_filter_fn(dict(official), model)
    assert "rope.periods" not in timm_sd  # timm's files do not carry them
    paths["timm"] = tmp_path / f"{name}-timm.safetensors"
    save_file({k: v.contiguous() for k, v in timm_sd.items()}, paths["timm"])
    del timm_sd
    paths["transformers"] = tmp_path / f"{name}-hf.safetensors"
    save_file(transformers_state_dict(official), paths["transformers"])
    return official, paths


def build(path, name: str, depth: int) -> Backbone:
    """What load_backbone does, at a chosen depth."""
    variant = get_variant(name)
    with torch.device("meta"):
        vit = create_vit(variant, depth=depth)
    load_weights_into(vit, read_state_dict(path), str(path), variant)
    spec = BackboneSpec(state_dict_sha256(vit.state_dict()), str(path), depth, name)
    return Backbone(vit, spec)


def with_layers(backbone: Backbone, layers: int) -> Backbone:
    return Backbone(backbone.vit, dataclasses.replace(backbone.spec, layers=layers))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b).norm() / b.norm())


@pytest.mark.parametrize("name", DINOV3)
def test_every_variant_in_every_format_equals_the_official_code(tmp_path, name):
    variant, depth = get_variant(name), DEPTH[name]
    official, paths = write_checkpoints(tmp_path, name, depth)
    ref = official_features(official, X, depth, variant.num_heads)  # every block, normed
    hashes = set()
    for fmt, path in paths.items():
        backbone = build(path, name, depth)
        hashes.add(backbone.spec.weights_sha256)
        for layers in sorted({1, depth}):
            ours = with_layers(backbone, layers)(X)
            assert ours.shape == (2, layers * variant.embed_dim, 3, 5), fmt
            expected = ref[:, -layers * variant.embed_dim :]
            assert relative_error(ours, expected) < 2e-5, (fmt, layers)
            # what a float16 cache holds
            assert relative_error(ours.half(), expected) < 1e-3, (fmt, layers)
        del backbone
    assert len(hashes) == 1  # the same weights in any format are the same backbone


@pytest.mark.parametrize("name", ["dinov3_vits16", "dinov3_vits16plus"])
def test_full_depth_last_four_layers_equal_the_official_code(tmp_path, name):
    """load_backbone end to end on a full-depth official file: `--layers 4` is the official
    get_intermediate_layers(n=4, norm=True), `--layers 1` its x_norm_patchtokens."""
    variant = get_variant(name)
    official = random_official_state_dict(name, variant.depth, seed=2)
    torch.save(official, tmp_path / variant.official_file)
    backbone = load_backbone(str(tmp_path / variant.official_file), layers=4, name=name)
    ref = official_features(official, X, 4, variant.num_heads)
    assert relative_error(backbone(X), ref) < 2e-5
    ref1 = official_features(official, X, 1, variant.num_heads)
    torch.testing.assert_close(ref[:, -variant.embed_dim :], ref1, rtol=0, atol=0)
    assert relative_error(with_layers(backbone, 1)(X), ref1) < 2e-5
    # RoPE needs no resize: a square grid and a tall one are as exact
    for x in (X[:, :, :64, :64], X[:, :, :48, :16]):
        ref_x = official_features(official, x, 1, variant.num_heads)
        assert relative_error(with_layers(backbone, 1)(x), ref_x) < 2e-5


def test_rope_periods_follow_the_weights_dtype(tmp_path):
    """The distilled ViTs' periods were computed in bfloat16 and are stored so; recomputing
    them in float32 (timm's and transformers' own choice) would move the features, and the
    official forward uses the stored ones. Files without periods get the official values."""
    name = "dinov3_vits16"
    official, paths = write_checkpoints(tmp_path, name, 1)
    fp32 = dict(official, **{"rope_embed.periods": official_rope_periods(64, torch.float32)})
    assert not torch.equal(fp32["rope_embed.periods"], official["rope_embed.periods"])
    ours = build(paths["timm"], name, 1)(X)
    assert relative_error(ours, official_features(official, X, 1, 6)) < 2e-5
    assert relative_error(ours, official_features(fp32, X, 1, 6)) > 1e-4
    # an official file's own periods are used as they are
    torch.save(fp32, tmp_path / "fp32.pth")
    assert (
        relative_error(build(tmp_path / "fp32.pth", name, 1)(X), official_features(fp32, X, 1, 6))
        < 2e-5
    )


def test_the_key_bias_is_masked():
    """A key bias that the mask removes changes nothing; one that the mask keeps cannot be
    represented and is refused rather than dropped."""
    official = random_official_state_dict("dinov3_vits16", 1, seed=5)
    converted = to_timm_layout(official)
    q, _, v = official["blocks.0.attn.qkv.bias"].chunk(3)
    torch.testing.assert_close(converted["blocks.0.attn.q_bias"], q)
    torch.testing.assert_close(converted["blocks.0.attn.v_bias"], v)
    official["blocks.0.attn.qkv.bias_mask"] = torch.ones(3 * 384)
    with pytest.raises(KeyError, match="bias_mask"):
        to_timm_layout(official)


def test_7b_on_the_meta_device():
    """The 7B at full size: every official tensor maps to timm's keys and shapes, the variant
    is recognised, the parameter count is the registry's. Memory: 6.7 B parameters are 27 GB
    in float32 (the loader's dtype; 13.4 GB in bfloat16 if cast)."""
    name = "dinov3_vit7b16"
    variant = get_variant(name)
    with torch.device("meta"):
        vit = create_vit(variant)
        official = random_official_state_dict(name, variant.depth, seed=0)
    converted = to_timm_layout(official)
    own = vit.state_dict()
    assert set(converted) == set(own) and "blocks.0.attn.q_bias" not in own
    assert all(converted[k].shape == own[k].shape for k in own)
    shape = weights_shape(converted)
    assert (shape.family, shape.depth, shape.ffn, shape.embed_dim) == ("dinov3", 40, "swiglu", 4096)
    params = sum(p.numel() for p in vit.parameters()) / 1e6
    assert abs(params - variant.params_m) < 0.01
    assert own["blocks.0.mlp.fc1_g.weight"].shape == (8192, 4096)  # swiglu64 of 3 x 4096


def test_registry_matches_the_official_hub():
    for name in DINOV3:
        v = get_variant(name)
        with torch.device("meta"):
            vit = create_vit(v, depth=1)
        assert (v.patch_size, v.registers, v.prefix_tokens) == (16, 4, 5)
        assert vit.blocks[0].norm1.eps == 1e-5
        fc2 = vit.blocks[0].mlp.fc2.weight
        assert fc2.shape[1] == hidden_width(name, v.embed_dim), name
        assert (vit.blocks[0].attn.q_bias is not None) == OFFICIAL[name]["qkv_bias"]
        assert v.official_file.startswith(f"{name}_pretrain_lvd1689m-")
        assert v.transformers_repo == f"facebook/{name.replace('_', '-')}-pretrain-lvd1689m"
        assert v.default_size == (272, 480)


def test_refusals_name_the_file_and_the_problem(tmp_path):
    v2 = {"cls_token": torch.zeros(1, 1, 384), "pos_embed": torch.zeros(1, 1370, 384)}
    from tests.models.test_backbone import random_official_state_dict as dinov2_state_dict

    torch.save(dinov2_state_dict(get_variant("dinov2_vits14"), 1, 0), tmp_path / "v2.pth")
    with pytest.raises(WeightsError, match=r"v2.pth: weights of dinov2_vits14, not dinov3_vits16"):
        load_backbone(str(tmp_path / "v2.pth"), name="dinov3_vits16")
    torch.save(random_official_state_dict("dinov3_vits16plus", 1, 0), tmp_path / "splus.pth")
    with pytest.raises(WeightsError, match=r"weights of dinov3_vits16plus, not dinov3_vits16;"):
        load_backbone(str(tmp_path / "splus.pth"), name="dinov3_vits16")
    sat = tmp_path / "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"
    torch.save(v2, sat)
    with pytest.raises(WeightsError, match=r"sat493m-eadcf0ff.pth: satellite \(SAT-493M\)"):
        load_backbone(str(sat), name="dinov3_vitl16")
    # a size of DINOv2's patch for a DINOv3 backbone
    r = CliRunner().invoke(
        cli,
        [
            "extract",
            str(tmp_path),
            str(tmp_path / "c.zarr"),
            "--backbone",
            "dinov3_vits16",
            "--size",
            "266x476",
            "--weights",
            "random",
        ],
    )
    assert r.exit_code == 1
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "size 266x476: both sides must be positive multiples of 16, the backbone's patch size "
            "(e.g. 272x480)"
        )
    )


def test_backbones_lists_both_families():
    r = CliRunner().invoke(cli, ["backbones"])
    assert r.exit_code == 0, r.output
    lines = {line.split()[0]: line.split() for line in r.output.splitlines()[1:] if line}
    for name, v in BACKBONES.items():
        assert lines[name][1:4] == [v.family, str(v.patch_size), "x".join(map(str, v.default_size))]
    assert "DINOv3 License" in r.output


def cli_ok(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def vits16_file(tmp_path_factory):
    """A full-depth random ViT-S/16 under its official release file name."""
    root = tmp_path_factory.mktemp("v3")
    official = random_official_state_dict("dinov3_vits16", 12, seed=7)
    path = root / get_variant("dinov3_vits16").official_file
    torch.save(official, path)
    return official, path


def test_cli_extract_with_the_official_file_equals_the_official_code(
    dataset, vits16_file, tmp_path
):
    """`offroad-seg extract DATA CACHE --backbone dinov3_vits16 --weights dinov3_vits16_
    pretrain_lvd1689m-08c60483.pth` at the default size (272x480 for DINOv3), as in the issue:
    the cached float16 features are the official forward of the preprocessed images."""
    official, path = vits16_file
    cache = tmp_path / "c.zarr"
    cli_ok(
        "extract",
        dataset / "val",
        cache,
        "--backbone",
        "dinov3_vits16",
        "--weights",
        path,
        "--workers",
        "0",
        "--device",
        "cpu",
    )
    fc = FeatureCache.open(str(cache))
    prep = fc.spec.preprocessing
    assert (prep.size, prep.patch_size, prep.grid) == ((272, 480), 16, (17, 30))
    assert fc.spec.backbone.name == "dinov3_vits16"
    sample = list_samples(dataset / "val")[0]
    x = preprocess(image_to_tensor(read_image(sample.image)), prep)
    ref = official_features(official, x, 1, 6)
    cached = torch.from_numpy(np.asarray(fc.array("features")[0:1, 0])).float()  # view 0
    assert cached.shape == ref.shape == (1, 384, 17, 30)
    assert relative_error(cached, ref) < 1e-3


def test_dinov3_cache_trains_evaluates_exports_and_predicts(dataset, vits16_file, tmp_path):
    """A DINOv3 cache end to end, small: int8 train cache (flip view), float16 val cache at
    64x112 (4x7 tokens), a head trained by the CLI, evaluated, exported, and the exported model
    predicting the same masks as the torch head."""
    _, weights = vits16_file
    common = [
        "--backbone",
        "dinov3_vits16",
        "--weights",
        weights,
        "--size",
        "64x112",
        "--workers",
        "0",
        "--device",
        "cpu",
    ]
    cli_ok(
        "extract",
        dataset / "train",
        tmp_path / "train.zarr",
        "--dtype",
        "int8",
        "--views",
        "flip",
        *common,
    )
    cli_ok("extract", dataset / "val", tmp_path / "val.zarr", *common)
    run = tmp_path / "run"
    cli_ok(
        "train",
        tmp_path / "train.zarr",
        run,
        "--val-cache",
        tmp_path / "val.zarr",
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--head",
        "convnext",
    )
    head = run / "segmentation_head.pth"
    cli_ok(
        "evaluate", head, dataset / "val", tmp_path / "eval", "--workers", "0", "--comparisons", "0"
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["backbone"]["name"] == "dinov3_vits16"
    onnx_path = tmp_path / "model.onnx"
    cli_ok("export", head, onnx_path)
    for engine, out in (("torch", "t"), ("onnxruntime", "o")):
        model = head if engine == "torch" else onnx_path
        cli_ok("predict", model, dataset / "val", tmp_path / out, "--workers", "0")
    for s in list_samples(dataset / "val"):
        a, b = (read_mask(tmp_path / d / "masks" / s.name) for d in ("t", "o"))
        assert a.shape == (112, 196) and float((a == b).mean()) >= 0.999
    meta = json.loads(_onnx_meta(onnx_path)["preprocessing"])
    assert meta["patch_size"] == 16 and meta["size"] == [64, 112]


def _onnx_meta(path) -> dict:
    onnx = pytest.importorskip("onnx")
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
