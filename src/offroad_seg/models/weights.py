"""Backbone weight files: reading the accepted formats, naming their variant, finding them.

Formats, all converted to timm's key layout (the one the backbone is built in):
- DINOv2's official `dinov2_*_pretrain.pth` (facebookresearch/dinov2): timm's names for the
  plain blocks, plus a mask token, SwiGLU MLPs as `mlp.w12`/`mlp.w3` (ViT-g), register tokens as
  `register_tokens` with the class token's position embedding still in `pos_embed`, and
  optionally chunked blocks (`blocks.<chunk>.<i>.`);
- DINOv3's official `dinov3_*_pretrain_lvd1689m-<hash>.pth` (facebookresearch/dinov3): storage
  tokens, `ls1.gamma`, the fused qkv bias with its `bias_mask` (the key third masked to zero),
  SwiGLU as `mlp.w1`/`w2`/`w3`, the RoPE periods as `rope_embed.periods`, and a mask token and
  (7B) a `local_cls_norm` that only training uses;
- timm's `.safetensors` (`timm/vit_*_patch14_*dinov2.lvd142m`, `timm/vit_*_patch16_dinov3*`):
  already in layout;
- transformers' `Dinov2Model` / `Dinov2WithRegistersModel` (`facebook/dinov2-*`) and
  `DINOv3ViTModel` (`facebook/dinov3-*-pretrain-lvd1689m`).

DINOv2 register variants are stored the way timm stores them: the class token's position
embedding is folded into the class token and `pos_embed` holds the patch positions only (exactly
timm's own conversion). DINOv3 weights keep the q and v biases (timm's `_qkvb` layout; the
masked key bias is zero) and the RoPE periods as `rope.periods`: the official files hold them
(as the weights were trained: bfloat16 values for the distilled ViTs), timm and transformers
files do not, and get the values the official code computes for the variant. The weights'
identity is the sha256 of the tensors in that layout, so the same weights in any accepted format
are the same backbone.

Resolution of `--weights`, first found wins: an explicit path, `$OFFROAD_SEG_WEIGHTS`, the
torch hub cache (the official file name), the Hugging Face cache (timm's, then transformers'
repository), then a download of timm's repository when the hub answers (offline machines fail
in milliseconds instead of sitting in the hub client's retries). DINOv3's satellite weights
(SAT-493M) are refused by name: they expect other normalisation statistics.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch

from offroad_seg.errors import WeightsError
from offroad_seg.models.rope import rope_periods

if TYPE_CHECKING:
    from offroad_seg.models.variants import BackboneVariant

log = logging.getLogger(__name__)

RANDOM = "random"
CONNECT_TIMEOUT_S = 3.0


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over tensors in key order: name, shape and float32 bytes."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}:{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- formats


def _fold_registers(
    out: dict[str, torch.Tensor], cls: torch.Tensor, pos: torch.Tensor, registers: torch.Tensor
) -> None:
    """timm's layout for register variants: neither the class nor the register tokens overlap
    `pos_embed`; the class token carries its position embedding."""
    out["reg_token"] = registers
    out["cls_token"] = cls + pos[:, :1]
    out["pos_embed"] = pos[:, 1:]


def _transformers_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' Dinov2(WithRegisters)Model layout -> timm layout (q, k, v fused)."""
    out = {
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    cls, pos = sd["embeddings.cls_token"], sd["embeddings.position_embeddings"]
    if "embeddings.register_tokens" in sd:
        _fold_registers(out, cls, pos, sd["embeddings.register_tokens"])
    else:
        out["cls_token"], out["pos_embed"] = cls, pos
    i = 0
    while f"encoder.layer.{i}.norm1.weight" in sd:
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        att = src + "attention.attention."
        swiglu = src + "mlp.weights_in.weight" in sd
        for p in ("weight", "bias"):
            out[dst + f"attn.qkv.{p}"] = torch.cat(
                [sd[att + f"query.{p}"], sd[att + f"key.{p}"], sd[att + f"value.{p}"]]
            )
            out[dst + f"attn.proj.{p}"] = sd[src + f"attention.output.dense.{p}"]
            for name in ("norm1", "norm2"):
                out[dst + f"{name}.{p}"] = sd[src + f"{name}.{p}"]
            if swiglu:  # transformers' packed SwiGLU is timm's GluMlp (fc1 packed, fc2)
                out[dst + f"mlp.fc1.{p}"] = sd[src + f"mlp.weights_in.{p}"]
                out[dst + f"mlp.fc2.{p}"] = sd[src + f"mlp.weights_out.{p}"]
            else:
                out[dst + f"mlp.fc1.{p}"] = sd[src + f"mlp.fc1.{p}"]
                out[dst + f"mlp.fc2.{p}"] = sd[src + f"mlp.fc2.{p}"]
        out[dst + "ls1.gamma"] = sd[src + "layer_scale1.lambda1"]
        out[dst + "ls2.gamma"] = sd[src + "layer_scale2.lambda1"]
        i += 1
    return out


_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")
_SWIGLU = (("mlp.w12.", "mlp.fc1."), ("mlp.w3.", "mlp.fc2."))


def _official_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """facebookresearch/dinov2 layout -> timm layout (as timm's own conversion does)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key == "mask_token" or key in ("register_tokens", "cls_token", "pos_embed"):
            continue  # the mask token only serves the self-supervised objective
        key = _CHUNKED_BLOCK.sub(r"blocks.\1.", key)  # FSDP block chunks: blocks.c.i -> i
        for old, new in _SWIGLU:
            key = key.replace(old, new)
        out[key] = value
    if "register_tokens" in sd:
        _fold_registers(out, sd["cls_token"], sd["pos_embed"], sd["register_tokens"])
    else:
        out["cls_token"], out["pos_embed"] = sd["cls_token"], sd["pos_embed"]
    return out


_DINOV3_DROPPED = ("mask_token", "local_cls_norm.", "cls_norm.")  # training only / class token
_DINOV3_RENAMES = (
    ("storage_tokens", "reg_token"),
    ("rope_embed.periods", "rope.periods"),
    (".ls1.gamma", ".gamma_1"),
    (".ls2.gamma", ".gamma_2"),
    (".mlp.w1.", ".mlp.fc1_g."),  # official SwiGLU: silu(w1 x) * w2 x -> w3; timm's fc1_g/x
    (".mlp.w2.", ".mlp.fc1_x."),
    (".mlp.w3.", ".mlp.fc2."),
)


def _split_qkv_bias(out: dict, prefix: str, bias: torch.Tensor, mask: torch.Tensor | None) -> None:
    """The official LinearKMaskedBias: the bias times its mask. timm keeps q and v biases and a
    zero key bias, which is what a trained mask (ones, zeros over the key third, ones) gives."""
    if mask is not None:
        bias = bias * mask.to(bias.dtype)
    q, k, v = bias.chunk(3)
    if mask is None:
        k = torch.zeros_like(k)  # mask_k_bias: the key bias never reaches the keys
    if bool(k.ne(0).any()):
        raise KeyError(f"{prefix}qkv.bias_mask (a key bias that is not masked to zero)")
    out[prefix + "q_bias"], out[prefix + "v_bias"] = q, v


def _dinov3_official_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """facebookresearch/dinov3 layout -> timm's DINOv3 (Eva) layout."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith(_DINOV3_DROPPED) or key.endswith(("qkv.bias", "qkv.bias_mask")):
            continue
        for old, new in _DINOV3_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    for key, value in sd.items():
        if key.endswith(".attn.qkv.bias"):
            prefix = key.removesuffix("qkv.bias")
            _split_qkv_bias(out, prefix, value, sd.get(prefix + "qkv.bias_mask"))
    return out


def _dinov3_transformers_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' DINOv3ViTModel layout -> timm's DINOv3 layout (q, k, v fused)."""
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "reg_token": sd["embeddings.register_tokens"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    i = 0
    while f"layer.{i}.norm1.weight" in sd:
        src, dst = f"layer.{i}.", f"blocks.{i}."
        att = src + "attention."
        out[dst + "attn.qkv.weight"] = torch.cat(
            [sd[att + f"{n}_proj.weight"] for n in ("q", "k", "v")]
        )
        if att + "q_proj.bias" in sd:
            k_bias = sd.get(att + "k_proj.bias")
            if k_bias is not None and bool(k_bias.ne(0).any()):
                raise KeyError(f"{att}k_proj.bias (the official key bias is masked to zero)")
            out[dst + "attn.q_bias"] = sd[att + "q_proj.bias"]
            out[dst + "attn.v_bias"] = sd[att + "v_proj.bias"]
        gated = src + "mlp.gate_proj.weight" in sd
        for p in ("weight", "bias"):
            out[dst + f"attn.proj.{p}"] = sd[att + f"o_proj.{p}"]
            for name in ("norm1", "norm2"):
                out[dst + f"{name}.{p}"] = sd[src + f"{name}.{p}"]
            if gated:
                out[dst + f"mlp.fc1_g.{p}"] = sd[src + f"mlp.gate_proj.{p}"]
                out[dst + f"mlp.fc1_x.{p}"] = sd[src + f"mlp.up_proj.{p}"]
            else:
                out[dst + f"mlp.fc1.{p}"] = sd[src + f"mlp.up_proj.{p}"]
            out[dst + f"mlp.fc2.{p}"] = sd[src + f"mlp.down_proj.{p}"]
        out[dst + "gamma_1"] = sd[src + "layer_scale1.lambda1"]
        out[dst + "gamma_2"] = sd[src + "layer_scale2.lambda1"]
        i += 1
    return out


def to_timm_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official, timm or transformers state dicts (of any variant of either family) -> timm's
    layout."""
    for wrapper in ("model", "state_dict", "teacher"):
        if wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}
    if "embeddings.patch_embeddings.projection.weight" in sd:
        return _transformers_to_timm(sd)
    if "embeddings.patch_embeddings.weight" in sd:
        return _dinov3_transformers_to_timm(sd)
    if "storage_tokens" in sd:
        return _dinov3_official_to_timm(sd)
    if "reg_token" in sd:  # timm's own register layouts (DINOv2 folded; DINOv3)
        return dict(sd)
    return _official_to_timm(sd)


def load_tensors(path: Path):
    """torch.load of a pickle holding tensors only (`weights_only`: nothing in the file can run
    code), on the CPU. A pickle of another protocol warns before it fails; its failure is the
    one line (`not_a_checkpoint`), so the warning is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True)


def not_a_checkpoint(path: Path, what: str) -> str:
    """One line on a file that torch.load or safetensors cannot read, by its first bytes (their
    own messages are paragraphs, and torch's advises loading with weights_only=False, which
    would run whatever code the file holds)."""
    try:
        with open(path, "rb") as f:
            start = f.read(512)
    except OSError as e:
        return f"{path}: cannot read {what} ({e.strerror or type(e).__name__})"
    text = start.lstrip().lower()
    if not start:
        return f"{path}: an empty file, not a {what}"
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")) or (
        text.startswith(b"<") and b"html" in text
    ):
        return f"{path}: an HTML page, not a {what} (a download probably failed; download it again)"
    if start.startswith(b"PK\x03\x04"):
        return f"{path}: a damaged {what} (its archive is truncated or corrupt); use an intact copy"
    if start.startswith(b"\x80"):
        return (
            f"{path}: not a {what} of plain tensors (a Python pickle with other objects, not "
            "loaded: unpickling them could run code; save the model's state_dict() instead)"
        )
    return f"{path}: not a {what} (unrecognised content: the file is damaged or of another kind)"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors or a torch pickle (.pth/.pt/.bin) checkpoint, weights only."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = load_tensors(path)
    except FileNotFoundError as e:
        raise WeightsError(f"{path}: weights file not found") from e
    except Exception as e:  # torch and safetensors raise many types for a bad file
        raise WeightsError(not_a_checkpoint(path, "weights file")) from e
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: not a state dict (found {type(sd).__name__})")
    return sd


# ----------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class WeightsShape:
    """What a timm-layout state dict says about its architecture."""

    embed_dim: int
    depth: int
    registers: int
    ffn: str  # "mlp" or "swiglu"
    family: str = "dinov2"

    def describe(self) -> str:
        reg = f", {self.registers} registers" if self.registers else ""
        return f"{self.family}, width {self.embed_dim}, {self.depth} blocks, {self.ffn} MLP{reg}"


def weights_shape(sd: dict[str, torch.Tensor]) -> WeightsShape:
    """Read the architecture off a timm-layout state dict (KeyError when it is not a ViT)."""
    embed_dim = int(sd["cls_token"].shape[-1])
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    registers = int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0
    if "blocks.0.gamma_1" in sd:  # timm's Eva: DINOv3 (separate SwiGLU gate and value)
        ffn = "swiglu" if "blocks.0.mlp.fc1_g.weight" in sd else "mlp"
        return WeightsShape(embed_dim, len(blocks), registers, ffn, "dinov3")
    fc1, fc2 = sd["blocks.0.mlp.fc1.weight"], sd["blocks.0.mlp.fc2.weight"]
    # a packed SwiGLU's fc1 is twice as wide as the fc2 input it feeds
    ffn = "swiglu" if fc1.shape[0] == 2 * fc2.shape[1] else "mlp"
    return WeightsShape(embed_dim, len(blocks), registers, ffn)


def variant_of(shape: WeightsShape) -> BackboneVariant | None:
    """The registered variant with this family, width, MLP and register count, if any (they
    name a variant uniquely; a wrong depth is reported key by key)."""
    from offroad_seg.models.variants import BACKBONES

    for variant in BACKBONES.values():
        if (variant.family, variant.embed_dim, variant.registers, variant.ffn) == (
            shape.family,
            shape.embed_dim,
            shape.registers,
            shape.ffn,
        ):
            return variant
    return None


def refuse_satellite(source: str | Path) -> None:
    """DINOv3's SAT-493M weights were trained on other normalisation statistics than the
    ImageNet ones every cache is made with: refused by name rather than silently misused."""
    from offroad_seg.models.variants import SATELLITE_TAG

    if SATELLITE_TAG in Path(source).name.lower():
        raise WeightsError(
            f"{source}: satellite (SAT-493M) weights expect their own normalisation statistics, "
            "not the ImageNet ones this tool uses; pass the LVD-1689M weights of the variant"
        )


def complete_dinov3(
    sd: dict[str, torch.Tensor], vit: torch.nn.Module, variant: BackboneVariant
) -> None:
    """What timm and transformers files of DINOv3 leave out, as the official forward has it:
    the RoPE periods (computed as the official code does for the variant, see
    `rope.rope_periods`; the official files hold them) and, for timm's repositories
    without `_qkvb`, the q and v biases (zero: exactly what those files compute)."""
    own = vit.state_dict()
    if "rope.periods" not in sd and "rope.periods" in own:
        sd["rope.periods"] = rope_periods(variant.head_dim, variant.rope_base, variant.rope_dtype)
    if "blocks.0.attn.q_bias" in own and not any(k.endswith(".attn.q_bias") for k in sd):
        for key in own:
            if key.endswith((".attn.q_bias", ".attn.v_bias")):
                sd[key] = torch.zeros(own[key].shape)


def check_variant(sd: dict[str, torch.Tensor], variant: BackboneVariant, source: str) -> None:
    """Refuse weights of another variant with one line that names both."""
    try:
        shape = weights_shape(sd)
    except (KeyError, IndexError) as e:
        raise WeightsError(f"{source}: not a DINOv2 or DINOv3 checkpoint (missing {e})") from e
    found = variant_of(shape)
    if found == variant:
        return  # the depth is checked key by key (tests build truncated models)
    if found is not None:
        raise WeightsError(
            f"{source}: weights of {found.name}, not {variant.name}; "
            f"pass --backbone {found.name} (or weights of {variant.name})"
        )
    raise WeightsError(
        f"{source}: not a {variant.name} checkpoint ({shape.describe()}; "
        f"{variant.name} has width {variant.embed_dim}, {variant.depth} blocks)"
    )


def load_weights_into(
    vit: torch.nn.Module, sd: dict[str, torch.Tensor], source: str, variant: BackboneVariant
) -> None:
    """Load a checkpoint of `variant` strictly; anything else is refused by name. `vit` may be
    on the meta device: the checkpoint's tensors then become its parameters."""
    try:
        sd = to_timm_layout(sd)
    except KeyError as e:
        raise WeightsError(f"{source}: not a DINOv2 or DINOv3 checkpoint (missing {e})") from e
    check_variant(sd, variant, source)
    if variant.family == "dinov3":
        complete_dinov3(sd, vit, variant)
    own = vit.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected keys {unexpected[:3]}"
        raise WeightsError(f"{source}: not a {variant.name} checkpoint ({detail})")
    for key, value in own.items():
        if not isinstance(sd[key], torch.Tensor) or sd[key].shape != value.shape:
            shape = tuple(getattr(sd[key], "shape", ()))
            raise WeightsError(
                f"{source}: not a {variant.name} checkpoint ({key} has shape {shape}, "
                f"expected {tuple(value.shape)})"
            )
    vit.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    _materialise_zero_buffers(vit)


# buffers outside the state dict that stay on the meta device when a model built there is
# loaded; each is zero by construction (timm's Eva: the fixed key bias)
_ZERO_BUFFERS = ("k_bias",)


def _materialise_zero_buffers(vit: torch.nn.Module) -> None:
    for module in vit.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_meta:
                if name not in _ZERO_BUFFERS:
                    raise RuntimeError(f"buffer {name!r} has no value after loading")
                module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype)


# ----------------------------------------------------------------------------- resolution


def _hub_checkpoint(variant: BackboneVariant) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / variant.official_file


def _hf_cached(variant: BackboneVariant) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for repo in variant.hf_repos:
        found = try_to_load_from_cache(repo_id=repo, filename="model.safetensors")
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_unreachable(timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why a TCP connection cannot reach the Hugging Face hub (or the HTTPS proxy in between)
    within `timeout`, or None when it can. The hub client retries for ~25 s before it gives up
    on an offline machine; this answers in milliseconds."""
    proxy = next(
        (
            os.environ[k]
            for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
            if os.environ.get(k)
        ),
        None,
    )
    url = urlparse(proxy or os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname
    port = url.port or (443 if url.scheme in ("https", "") else 80)
    if not host:
        return None  # an endpoint we cannot parse: let the client try
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"the Hugging Face hub is not reachable: {host}:{port}: {e}"
    return None


def _hf_download(variant: BackboneVariant) -> tuple[Path | None, str]:
    """timm's repository of `variant` downloaded, or None and why not (which the error that
    follows carries: one line, not a log line before it)."""
    if _offline():
        return None, "HF_HUB_OFFLINE is set"
    unreachable = hub_unreachable()
    if unreachable:
        return None, unreachable
    try:
        from huggingface_hub import hf_hub_download

        log.info("downloading %s/model.safetensors from the Hugging Face hub", variant.timm_repo)
        return Path(hf_hub_download(repo_id=variant.timm_repo, filename="model.safetensors")), ""
    except Exception as e:  # proxy, auth, a vanished repository: "not available here"
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        return None, f"downloading {variant.timm_repo} failed: {type(e).__name__}: {reason}"


def local_weights(variant: BackboneVariant) -> Path | None:
    """The variant's weights found on this machine without a download and without being named
    (--weights, $OFFROAD_SEG_WEIGHTS): the torch hub cache's official file, else the Hugging
    Face cache's timm or transformers file; `auto` resolves to it offline."""
    hub = _hub_checkpoint(variant)
    return hub if hub.is_file() else _hf_cached(variant)


def find_weights(weights: str | None, variant: BackboneVariant, allow_download: bool = True) -> str:
    """Resolve `--weights` to a file path or 'random', in the documented order."""
    if weights == RANDOM:
        return RANDOM
    if weights and weights != "auto":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"{path}: weights file not found")
        refuse_satellite(path)
        return str(path)
    env = os.environ.get("OFFROAD_SEG_WEIGHTS")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise WeightsError(f"{path} (from $OFFROAD_SEG_WEIGHTS): weights file not found")
        refuse_satellite(path)
        return str(path)
    local = local_weights(variant)
    if local is not None:
        return str(local)
    hub = _hub_checkpoint(variant)
    downloaded, why = _hf_download(variant) if allow_download else (None, "")
    if downloaded is not None:
        return str(downloaded)
    why = f" ({why})" if why else ""
    raise WeightsError(
        f"no {variant.name} weights found{why}: pass --weights PATH ({variant.official_file} or "
        f"a timm/transformers .safetensors), set $OFFROAD_SEG_WEIGHTS, put {variant.official_file} "
        f"in {hub.parent}, or cache {variant.timm_repo} from the Hugging Face hub; "
        "--weights random builds an untrained backbone for tests"
    )
