"""Frozen DINOv2 ViT-S/14 (timm's architecture) with the official position-embedding resize.

`Backbone(x)` maps normalised images (B, 3, rows, cols) to patch-token features
(B, C, rows/14, cols/14): the tokens after the final norm (`layers=1`, C=384, the seed's
`x_norm_patchtokens`) or the last four blocks, each normed, concatenated (`layers=4`, C=1536,
DINOv2's "+ms" protocol).

Weights resolve in this order: an explicit path, `$OFFROAD_SEG_WEIGHTS`, the torch hub cache
(`dinov2_vits14_pretrain.pth`), the Hugging Face cache (timm's and transformers' DINOv2-S
repos), then a download of timm's checkpoint. `random` builds an untrained backbone, only when
asked for by name. The weights' identity is the sha256 of their tensors in timm layout, so the
same weights saved in any of the accepted formats are recognised as the same backbone.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from offroad_seg.errors import WeightsError
from offroad_seg.preprocess import Preprocessing, normalize
from offroad_seg.runtime import autocast

log = logging.getLogger(__name__)

ARCH = "vit_small_patch14_dinov2"
EMBED_DIM = 384
NUM_BLOCKS = 12
PRETRAIN_GRID = 37  # 518 / 14: the grid the DINOv2 position embeddings were trained at
OFFICIAL_FILENAME = "dinov2_vits14_pretrain.pth"
HF_REPOS = (
    ("timm/vit_small_patch14_dinov2.lvd142m", "model.safetensors"),
    ("facebook/dinov2-small", "model.safetensors"),
)
RANDOM = "random"
_RANDOM_SEED = 0  # `--weights random` must give the same backbone in extract and evaluate


@dataclass(frozen=True)
class BackboneSpec:
    """What a cache or head was made with: enough to rebuild and to check compatibility."""

    weights_sha256: str
    weights_source: str
    layers: int = 1
    arch: str = ARCH
    embed_dim: int = EMBED_DIM

    @property
    def channels(self) -> int:
        return self.embed_dim * self.layers

    def to_dict(self) -> dict:
        return {**asdict(self), "channels": self.channels}

    @classmethod
    def from_dict(cls, d: dict) -> BackboneSpec:
        return cls(
            weights_sha256=d["weights_sha256"],
            weights_source=d["weights_source"],
            layers=int(d["layers"]),
            arch=d.get("arch", ARCH),
            embed_dim=int(d.get("embed_dim", EMBED_DIM)),
        )

    def identity(self) -> dict:
        """The fields that decide what the features are (the source path does not)."""
        return {"arch": self.arch, "weights_sha256": self.weights_sha256, "layers": self.layers}


def official_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Resize (1, 1 + M*M, C) position embeddings to a rows x cols grid exactly as the official
    DINOv2 code does: bicubic, scale factors (rows + 0.1) / M and (cols + 0.1) / M, no antialias,
    in float32, untouched when the grid is the pretraining grid. timm's default resize (by
    output size, antialiased) gives features that differ by a few percent."""
    num_patches = pos_embed.shape[1] - 1
    m = int(math.sqrt(num_patches))
    if rows == cols == m:
        return pos_embed
    dim = pos_embed.shape[-1]
    pe = pos_embed.float()
    patch_pe = pe[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
    patch_pe = F.interpolate(
        patch_pe,
        mode="bicubic",
        antialias=False,
        scale_factor=((rows + 0.1) / m, (cols + 0.1) / m),
    )
    if patch_pe.shape[-2:] != (rows, cols):
        raise RuntimeError(f"position embedding resize gave {patch_pe.shape[-2:]}")
    patch_pe = patch_pe.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat([pe[:, :1], patch_pe], dim=1).to(pos_embed.dtype)


def create_vit() -> nn.Module:
    """timm's DINOv2 ViT-S/14 at its pretraining size, without a classifier."""
    import timm  # 2-3 s of imports (torchvision models) that training on a cache never needs

    return timm.create_model(
        ARCH, pretrained=False, img_size=518, num_classes=0, dynamic_img_size=True
    )


class Backbone(nn.Module):
    """Frozen DINOv2 ViT-S/14 -> (B, C, rows/14, cols/14) patch-token features."""

    def __init__(self, vit: nn.Module, spec: BackboneSpec) -> None:
        super().__init__()
        if spec.layers not in (1, 4):
            raise ValueError(f"layers must be 1 or 4, not {spec.layers}")
        self.vit = vit.eval().requires_grad_(False)
        self.spec = spec
        self._pos_cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def pos_embed(self, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        key = (rows, cols, device)
        if key not in self._pos_cache:
            self._pos_cache[key] = official_pos_embed(self.vit.pos_embed.detach(), rows, cols).to(
                device
            )
        return self._pos_cache[key]

    def _apply(self, fn, recurse: bool = True):  # moving the module invalidates cached embeddings
        self._pos_cache = {}
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        rows, cols = h // 14, w // 14
        vit = self.vit
        t = vit.patch_embed(x).reshape(b, rows * cols, -1)  # NHWC with dynamic_img_size
        t = torch.cat([vit.cls_token.expand(b, -1, -1).to(t.dtype), t], dim=1)
        t = t + self.pos_embed(rows, cols, t.device).to(t.dtype)
        t = vit.norm_pre(t)
        first_kept = NUM_BLOCKS - self.spec.layers
        outs = []
        for i, block in enumerate(vit.blocks):
            t = block(t)
            if i >= first_kept:
                outs.append(vit.norm(t)[:, 1:])
        feats = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        return feats.transpose(1, 2).reshape(b, -1, rows, cols)

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, prep: Preprocessing, hflip: bool = False
    ) -> torch.Tensor:
        """The one path from resized uint8 images (B, 3, rows, cols), as `resize_image` makes
        them, to float32 features (B, C, h, w), for extract, evaluate and predict.
        `hflip=True` appends the mirrored images' features: (2B, C, h, w)."""
        device = self.vit.cls_token.device
        x = normalize(images.to(device, non_blocking=True), prep)
        if hflip:
            x = torch.cat([x, x.flip(-1)])
        with autocast(device):
            return self(x).float()


# ----------------------------------------------------------------------------- weights


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over tensors in key order: name, dtype, shape and float32 bytes."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}:{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _hf_transformers_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' Dinov2Model layout -> timm layout (q, k, v fused into qkv)."""
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    i = 0
    while f"encoder.layer.{i}.norm1.weight" in sd:
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        att = src + "attention.attention."
        for p in ("weight", "bias"):
            out[dst + f"attn.qkv.{p}"] = torch.cat(
                [sd[att + f"query.{p}"], sd[att + f"key.{p}"], sd[att + f"value.{p}"]]
            )
            out[dst + f"attn.proj.{p}"] = sd[src + f"attention.output.dense.{p}"]
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[dst + f"{name}.{p}"] = sd[src + f"{name}.{p}"]
        out[dst + "ls1.gamma"] = sd[src + "layer_scale1.lambda1"]
        out[dst + "ls2.gamma"] = sd[src + "layer_scale2.lambda1"]
        i += 1
    return out


def to_timm_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DINOv2, timm or transformers state dicts -> timm's key layout."""
    for wrapper in ("model", "state_dict", "teacher"):
        if wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}
    if "embeddings.patch_embeddings.projection.weight" in sd:
        return _hf_transformers_to_timm(sd)
    # The official checkpoint uses timm's names for ViT-S (ls1.gamma, attn.qkv, ...) and adds a
    # mask token that only the self-supervised objective uses.
    return {k: v for k, v in sd.items() if k != "mask_token"}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a .safetensors or a torch pickle (.pth/.pt/.bin) checkpoint, weights only."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise WeightsError(f"{path}: weights file not found") from e
    except Exception as e:  # torch and safetensors raise many types for a bad file
        raise WeightsError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: not a state dict (found {type(sd).__name__})")
    return sd


def load_weights_into(vit: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load a checkpoint strictly; anything but a DINOv2 ViT-S/14 is refused by name."""
    try:
        sd = to_timm_layout(sd)
    except KeyError as e:
        raise WeightsError(f"{source}: not a DINOv2 ViT-S/14 checkpoint (missing {e})") from e
    own = vit.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected keys {unexpected[:3]}"
        raise WeightsError(f"{source}: not a DINOv2 ViT-S/14 checkpoint ({detail})")
    for key, value in own.items():
        if not isinstance(sd[key], torch.Tensor) or sd[key].shape != value.shape:
            shape = tuple(getattr(sd[key], "shape", ()))
            raise WeightsError(
                f"{source}: not a DINOv2 ViT-S/14 checkpoint ({key} has shape {shape}, "
                f"expected {tuple(value.shape)})"
            )
    vit.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)


def _hub_checkpoint() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / OFFICIAL_FILENAME


def _hf_cached() -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for repo, filename in HF_REPOS:
        found = try_to_load_from_cache(repo_id=repo, filename=filename)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _hf_download() -> Path | None:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return None
    try:
        from huggingface_hub import hf_hub_download

        repo, filename = HF_REPOS[0]
        log.info("downloading %s/%s from the Hugging Face hub", repo, filename)
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except Exception as e:  # offline, proxy, auth: all mean "not available here"
        log.warning("could not download DINOv2 weights (%s: %s)", type(e).__name__, e)
        return None


def find_weights(weights: str | None, allow_download: bool = True) -> str:
    """Resolve `--weights` to a file path or 'random', in the documented order."""
    if weights == RANDOM:
        return RANDOM
    if weights and weights != "auto":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"{path}: weights file not found")
        return str(path)
    env = os.environ.get("OFFROAD_SEG_WEIGHTS")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise WeightsError(f"{path} (from $OFFROAD_SEG_WEIGHTS): weights file not found")
        return str(path)
    hub = _hub_checkpoint()
    if hub.is_file():
        return str(hub)
    cached = _hf_cached()
    if cached is not None:
        return str(cached)
    downloaded = _hf_download() if allow_download else None
    if downloaded is not None:
        return str(downloaded)
    raise WeightsError(
        "no DINOv2 ViT-S/14 weights found: pass --weights PATH (dinov2_vits14_pretrain.pth or "
        f"a timm/HF .safetensors), set $OFFROAD_SEG_WEIGHTS, put {OFFICIAL_FILENAME} in "
        f"{hub.parent}, or cache {HF_REPOS[0][0]} from the Hugging Face hub; "
        "--weights random builds an untrained backbone for tests"
    )


def load_backbone(
    weights: str | None = None,
    layers: int = 1,
    device: str | torch.device = "cpu",
    allow_download: bool = True,
) -> Backbone:
    """Build the frozen backbone from resolved weights (see module docstring for the order)."""
    source = find_weights(weights, allow_download=allow_download)
    if source == RANDOM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_SEED)
            vit = create_vit()
        log.warning("using an UNTRAINED (random) backbone: features carry no pretrained meaning")
    else:
        vit = create_vit()
        load_weights_into(vit, read_state_dict(Path(source)), source)
        log.info("loaded DINOv2 weights from %s", source)
    spec = BackboneSpec(
        weights_sha256=state_dict_sha256(vit.state_dict()), weights_source=source, layers=layers
    )
    return Backbone(vit, spec).to(device)
