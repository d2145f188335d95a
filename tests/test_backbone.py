import hashlib

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from offroad_seg.backbone import (
    ARCH,
    OFFICIAL_FILENAME,
    Backbone,
    find_weights,
    load_backbone,
    official_pos_embed,
    state_dict_sha256,
)
from offroad_seg.errors import WeightsError


def official_state_dict(timm_sd: dict) -> dict:
    """What facebookresearch/dinov2's dinov2_vits14_pretrain.pth holds: timm's names for
    ViT-S (blocks.N.ls1.gamma, attn.qkv, ...) plus the mask token."""
    sd = {k: v.clone() for k, v in timm_sd.items()}
    sd["mask_token"] = torch.zeros(1, 384)
    return sd


def transformers_state_dict(timm_sd: dict) -> dict:
    """transformers' Dinov2Model layout (facebook/dinov2-small)."""
    sd = {
        "embeddings.cls_token": timm_sd["cls_token"],
        "embeddings.mask_token": torch.zeros(1, 384),
        "embeddings.position_embeddings": timm_sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": timm_sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": timm_sd["patch_embed.proj.bias"],
        "layernorm.weight": timm_sd["norm.weight"],
        "layernorm.bias": timm_sd["norm.bias"],
    }
    for i in range(12):
        b, e = f"blocks.{i}.", f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            q, k, v = timm_sd[b + f"attn.qkv.{p}"].chunk(3)
            sd[e + f"attention.attention.query.{p}"] = q
            sd[e + f"attention.attention.key.{p}"] = k
            sd[e + f"attention.attention.value.{p}"] = v
            sd[e + f"attention.output.dense.{p}"] = timm_sd[b + f"attn.proj.{p}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                sd[e + f"{n}.{p}"] = timm_sd[b + f"{n}.{p}"]
        sd[e + "layer_scale1.lambda1"] = timm_sd[b + "ls1.gamma"]
        sd[e + "layer_scale2.lambda1"] = timm_sd[b + "ls2.gamma"]
    return {k: v.contiguous() for k, v in sd.items()}


@pytest.fixture(scope="module")
def trained_like_sd() -> dict:
    """Weights that differ from `--weights random` (another seed, non-trivial layer scales)."""
    torch.manual_seed(123)
    vit = timm.create_model(ARCH, pretrained=False, img_size=518, num_classes=0)
    sd = vit.state_dict()
    for k in sd:
        if k.endswith("gamma"):
            sd[k] = torch.full_like(sd[k], 0.3)
    return sd


def test_pos_embed_resize_equals_official_formula():
    pe = torch.randn(1, 1 + 37 * 37, 384)
    rows, cols = 19, 34
    ref = F.interpolate(
        pe[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2),
        mode="bicubic",
        scale_factor=((rows + 0.1) / 37, (cols + 0.1) / 37),
        antialias=False,
    )
    ref = torch.cat([pe[:, :1], ref.permute(0, 2, 3, 1).reshape(1, rows * cols, 384)], 1)
    torch.testing.assert_close(official_pos_embed(pe, rows, cols), ref, rtol=0, atol=0)
    # timm's own resize (by size, antialiased) differs measurably: the reason this exists
    from timm.layers import resample_abs_pos_embed

    timm_pe = resample_abs_pos_embed(pe, new_size=(rows, cols), num_prefix_tokens=1)
    assert (timm_pe - ref).abs().max() > 1e-3
    # at the pretraining grid the embeddings are used as they are
    assert official_pos_embed(pe, 37, 37) is pe


def test_features_shape_and_layers(backbone):
    x = torch.randn(2, 3, 56, 98)
    f = backbone(x)
    assert f.shape == (2, 384, 4, 7)
    four = Backbone(
        backbone.vit, backbone.spec.__class__(**{**backbone.spec.__dict__, "layers": 4})
    )
    f4 = four(x)
    assert f4.shape == (2, 1536, 4, 7)
    # the last of the four blocks, normed, is the single-layer output
    torch.testing.assert_close(f4[:, 3 * 384 :], f, rtol=0, atol=0)


def test_features_equal_timm_at_518(backbone):
    ref = timm.create_model(ARCH, pretrained=False, img_size=518, num_classes=0).eval()
    ref.load_state_dict(backbone.vit.state_dict())
    x = torch.randn(1, 3, 518, 518)
    with torch.no_grad():
        tokens = ref.forward_features(x)[:, 1:]
    ours = backbone(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(ours, tokens, rtol=1e-5, atol=1e-5)


def test_four_layers_equal_timm_intermediates(backbone):
    x = torch.randn(1, 3, 42, 56)
    spec4 = backbone.spec.__class__(**{**backbone.spec.__dict__, "layers": 4})
    ours = Backbone(backbone.vit, spec4)(x)
    # independent: run the blocks by hand with the official position embedding
    vit = backbone.vit
    t = vit.patch_embed(x).reshape(1, 12, 384)
    t = torch.cat([vit.cls_token, t], 1) + official_pos_embed(vit.pos_embed, 3, 4)
    outs = []
    with torch.no_grad():
        for i, blk in enumerate(vit.blocks):
            t = blk(t)
            if i >= 8:
                outs.append(vit.norm(t)[:, 1:])
    ref = torch.cat(outs, -1).transpose(1, 2).reshape(1, 1536, 3, 4)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_random_weights_are_reproducible(backbone):
    again = load_backbone("random")
    assert again.spec.weights_sha256 == backbone.spec.weights_sha256
    assert again.spec.weights_source == "random"


def test_load_official_pth_and_timm_safetensors(tmp_path, trained_like_sd):
    official = tmp_path / OFFICIAL_FILENAME
    torch.save(official_state_dict(trained_like_sd), official)
    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in trained_like_sd.items()}, st)
    hf = tmp_path / "hf.safetensors"
    save_file(transformers_state_dict(trained_like_sd), hf)

    expected = hashlib.sha256()
    for k in sorted(trained_like_sd):
        t = trained_like_sd[k].float().contiguous()
        expected.update(f"{k}:{tuple(t.shape)}\n".encode())
        expected.update(t.numpy().tobytes())

    x = torch.randn(1, 3, 28, 42)
    results = []
    for path in (official, st, hf):
        bb = load_backbone(str(path))
        assert bb.spec.weights_source == str(path)
        assert bb.spec.weights_sha256 == expected.hexdigest()
        for k, v in bb.vit.state_dict().items():
            torch.testing.assert_close(v, trained_like_sd[k], rtol=0, atol=0)
        results.append(bb(x))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    torch.testing.assert_close(results[0], results[2], rtol=0, atol=0)
    assert state_dict_sha256(trained_like_sd) != load_backbone("random").spec.weights_sha256


def test_not_a_vits14_checkpoint_refused(tmp_path, trained_like_sd):
    bad = {k: v for k, v in trained_like_sd.items() if not k.startswith("blocks.11.")}
    torch.save(bad, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match=r"partial.pth: not a DINOv2 ViT-S/14 checkpoint"):
        load_backbone(str(tmp_path / "partial.pth"))
    vitb = timm.create_model(
        "vit_base_patch14_dinov2", pretrained=False, num_classes=0, img_size=518
    )
    torch.save(vitb.state_dict(), tmp_path / "vitb.pth")
    with pytest.raises(WeightsError, match=r"vitb.pth: not a DINOv2 ViT-S/14.*shape"):
        load_backbone(str(tmp_path / "vitb.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"junk.pth: cannot read weights"):
        load_backbone(str(tmp_path / "junk.pth"))


def test_weights_resolution_order(tmp_path, monkeypatch, trained_like_sd):
    monkeypatch.delenv("OFFROAD_SEG_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hfc

    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)

    with pytest.raises(WeightsError, match="no DINOv2 ViT-S/14 weights found.*--weights"):
        find_weights("auto")

    # Hugging Face cache layout: models--ORG--NAME/{refs/main, snapshots/REV/FILE}
    repo = tmp_path / "hf" / "models--timm--vit_small_patch14_dinov2.lvd142m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in trained_like_sd.items()}, snap / "model.safetensors")
    assert find_weights("auto") == str(snap / "model.safetensors")

    hub = tmp_path / "torch" / "hub" / "checkpoints" / OFFICIAL_FILENAME
    hub.parent.mkdir(parents=True)
    torch.save(official_state_dict(trained_like_sd), hub)
    assert find_weights(None) == str(hub)

    env = tmp_path / "env.pth"
    torch.save(official_state_dict(trained_like_sd), env)
    monkeypatch.setenv("OFFROAD_SEG_WEIGHTS", str(env))
    assert find_weights("auto") == str(env)

    explicit = tmp_path / "explicit.safetensors"
    save_file({k: v.contiguous() for k, v in trained_like_sd.items()}, explicit)
    assert find_weights(str(explicit)) == str(explicit)
    assert find_weights("random") == "random"
    with pytest.raises(WeightsError, match="nope.pth: weights file not found"):
        find_weights(str(tmp_path / "nope.pth"))
    monkeypatch.setenv("OFFROAD_SEG_WEIGHTS", str(tmp_path / "gone.pth"))
    with pytest.raises(WeightsError, match=r"gone.pth \(from \$OFFROAD_SEG_WEIGHTS\)"):
        find_weights("auto")


def test_backbone_is_frozen(backbone):
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not backbone.vit.training
