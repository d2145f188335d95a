"""The segmentation model: backbone + head + preprocessing + class map, built from a head
checkpoint. `evaluate`, `predict`, the Python API (`Segmenter`) and `export` all go through it,
so they compute the same thing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from offroad_seg.core.runtime import autocast, resolve_device
from offroad_seg.data.classes import ClassMap
from offroad_seg.errors import ConfigError, OffroadSegError, WeightsError
from offroad_seg.models.backbone import Backbone, BackboneSpec, load_backbone
from offroad_seg.models.checkpoint import HeadCheckpoint, load_checkpoint
from offroad_seg.models.preprocess import Preprocessing
from offroad_seg.models.tuning import apply_tuning, member_tails
from offroad_seg.models.weights import RANDOM

TTA_MODES = ("none", "flip")


def check_tta(tta: str) -> None:
    if tta not in TTA_MODES:
        raise ConfigError(f"tta {tta!r}: expected one of {', '.join(TTA_MODES)}")


@dataclass(frozen=True)
class TTA:
    """Test-time augmentation: the passes whose logits are averaged at each image's original
    size. Each scale resizes the original image to the working size times the scale, rounded
    to multiples of the backbone's patch size (14 DINOv2, 16 DINOv3); `flip` adds each size's
    mirrored pass. A pass costs about scale^2 (tokens) to scale^4 (attention) of a plain one."""

    flip: bool = False
    scales: tuple[float, ...] = (1.0,)

    @classmethod
    def of(cls, mode: str, scales: Sequence[float] = (1.0,)) -> TTA:
        check_tta(mode)
        scales = tuple(float(s) for s in scales)
        if not scales or any(not s > 0 for s in scales):
            raise ConfigError(f"TTA scales {scales}: expected positive numbers")
        return cls(flip=mode == "flip", scales=scales)

    def sizes(self, prep: Preprocessing) -> list[tuple[int, int]]:
        """The working sizes of the passes, in scale order, without repeats."""
        sizes = []
        for s in self.scales:
            p = prep.patch_size
            size = tuple(max(p, round(v * s / p) * p) for v in prep.size)
            if size not in sizes:
                sizes.append(size)
        return sizes

    def extra_sizes(self, prep: Preprocessing) -> tuple[tuple[int, int], ...]:
        """The sizes other than the working size, which the decoding workers add."""
        return tuple(size for size in self.sizes(prep) if size != tuple(prep.size))

    def passes(self, prep: Preprocessing) -> int:
        return len(self.sizes(prep)) * (2 if self.flip else 1)

    def describe(self, prep: Preprocessing) -> str:
        if self == TTA():
            return "none"
        sizes = ", ".join(f"{r}x{c}" for r, c in self.sizes(prep))
        flip = "flip, " if self.flip else ""
        return f"{flip}sizes {sizes} ({self.passes(prep)} passes)"


def backbone_for_head(
    ckpt: HeadCheckpoint, weights: str | None, device: torch.device | str
) -> Backbone:
    """Load the backbone a head was trained on; other weights are refused. A tuned head's
    blocks (`ckpt.tuning`) are loaded into it, LoRA adapters merged into the weights; an
    ensemble with tuned members gets one tail per branch (`Backbone.set_tails`)."""
    backbone = matching_backbone(ckpt.backbone, weights, device, ckpt.path, "the head", "trained")
    try:
        if ckpt.tuning is not None:
            apply_tuning(backbone, ckpt.tuning, ckpt.payload["state_dict"])
        elif (layout := ckpt.tail_layout()) is not None:
            tunings, states = ckpt.member_tunings, ckpt.member_states()
            backbone.set_tails(member_tails(backbone, tunings, states, layout))
    except (ValueError, RuntimeError) as e:  # entries missing, unexpected or misshapen
        detail = str(e).splitlines()[0][:200] if str(e) else repr(e)
        raise OffroadSegError(
            f"{ckpt.path}: its tuned blocks do not fit {ckpt.backbone.name}: {detail}"
        ) from e
    return backbone


def matching_backbone(
    spec: BackboneSpec,
    weights: str | None,
    device: torch.device | str,
    owner: str | Path,
    what: str,
    made: str,
) -> Backbone:
    """The backbone `spec` names, from `weights` (None or 'auto': the recorded weights file
    when it is there, else the search order of `extract`); weights whose sha256 differs from
    the recorded one are refused in one line. `owner` (a head or cache path), `what` ("the
    head") and `made` ("trained") word the messages."""
    if weights in (None, "auto"):
        source = spec.weights_source
        if source == RANDOM or Path(source).is_file():
            weights = source
    try:
        backbone = load_backbone(weights, layers=spec.layers, device=device, name=spec.name)
    except WeightsError as e:
        raise WeightsError(
            f"{e} ({what} {owner} was {made} on {spec.name} weights with sha256 "
            f"{spec.weights_sha256[:16]}..., from {spec.weights_source})"
        ) from e
    if backbone.spec.weights_sha256 != spec.weights_sha256:
        raise WeightsError(
            f"{owner}: {made} on other backbone weights (sha256 "
            f"{spec.weights_sha256[:16]}... from {spec.weights_source}) than "
            f"{backbone.spec.weights_source} (sha256 {backbone.spec.weights_sha256[:16]}...); "
            f"pass --weights with {what}'s weights"
        )
    return backbone


class SegmentationModel(nn.Module):
    """Images at the working size in, class logits on the head's output grid out."""

    def __init__(self, backbone: Backbone, head: nn.Module, checkpoint: HeadCheckpoint) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head.eval()
        self.checkpoint = checkpoint

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path | HeadCheckpoint,
        weights: str | None = None,
        device: str | torch.device = "auto",
    ) -> SegmentationModel:
        """A head checkpoint (path or loaded) on the backbone it was trained on (`weights`:
        None for the head's own weights file, or a path / 'auto' / 'random' as in `extract`)."""
        loaded = isinstance(checkpoint, HeadCheckpoint)
        ckpt = checkpoint if loaded else load_checkpoint(checkpoint)
        device = resolve_device(device)
        backbone = backbone_for_head(ckpt, weights, device)
        return cls(backbone, ckpt.build(device), ckpt)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.checkpoint.preprocessing

    @property
    def backbone_spec(self) -> BackboneSpec:
        """The backbone weights this model runs: the checkpoint's sha256, and where they were
        loaded from (the file may differ from the one the head was trained with)."""
        return self.backbone.spec

    @property
    def class_map(self) -> ClassMap:
        return self.checkpoint.class_map

    @property
    def device(self) -> torch.device:
        return self.backbone.vit.cls_token.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, rows, cols) -> float32 logits (B, K, h, w)."""
        with autocast(x.device):
            return self.head(self.backbone(x)).float()

    @torch.no_grad()
    def logits(self, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
        """Resized uint8 images (B, 3, rows, cols), as `resize_image` makes them -> float32
        logits (B, K, h, w) on the head's grid; `tta="flip"` averages in the mirrored
        image's logits. The one inference path of evaluate, predict and the Python API."""
        check_tta(tta)
        flip = tta == "flip"
        feats = self.backbone.encode(images, self.preprocessing, hflip=flip)
        with autocast(feats.device):
            logits = self.head(feats).float()
        if flip:
            n = logits.shape[0] // 2
            logits = 0.5 * (logits[:n] + logits[n:].flip(-1))
        return logits

    @torch.no_grad()
    def tta_logits(
        self, images: torch.Tensor, scaled: Sequence[torch.Tensor], tta: TTA
    ) -> list[torch.Tensor]:
        """Logits of every pass of `tta`: `images` at the working size, `scaled` at
        `tta.extra_sizes(...)` (as the decoding workers make them). Each size's mirrored pass is
        averaged in on its own grid (bilinear resizing commutes with mirroring); the sizes are
        averaged after upsampling (`loss.predict_and_score` or `loss.upsample_mean`)."""
        mode = "flip" if tta.flip else "none"
        sizes = tta.sizes(self.preprocessing)
        by_size = dict(zip(tta.extra_sizes(self.preprocessing), scaled, strict=True))
        by_size[tuple(self.preprocessing.size)] = images
        return [self.logits(by_size[size], mode) for size in sizes]
