"""What an evaluation's numbers come from, as `report.html` and `evaluation_metrics.txt` show
it: the backbone and the weights it ran (their source and sha256 prefix), the head and the
settings it was trained with (from its checkpoint), and a banner when the backbone's weights
were random, since such numbers only show that the pipeline runs."""

from __future__ import annotations

from typing import Any

from offroad_seg.models.backbone import BackboneSpec
from offroad_seg.models.checkpoint import HeadCheckpoint
from offroad_seg.models.heads import HeadConfig
from offroad_seg.models.weights import RANDOM

SHA_PREFIX = 12  # hex digits of a sha256 shown: enough to tell weight files apart by eye

UNTRAINED_BANNER = (
    "UNTRAINED BACKBONE: its weights were random (--weights random), not pretrained, so these "
    "numbers show that the pipeline runs end to end, not what a pretrained backbone achieves."
)


def untrained_banner(spec: BackboneSpec) -> str | None:
    """The banner for a run whose backbone weights were random, else None."""
    return UNTRAINED_BANNER if spec.weights_source == RANDOM else None


def weights_text(spec: BackboneSpec) -> str:
    """'random (untrained), sha256 7e64a7aadf04' or 'PATH, sha256 ...'."""
    source = "random (untrained)" if spec.weights_source == RANDOM else spec.weights_source
    return f"{source}, sha256 {spec.weights_sha256[:SHA_PREFIX]}"


def head_text(cfg: HeadConfig) -> str:
    """'upnext (width 96, depth 2, dropout 0.1)': only the settings the head has."""
    spec = cfg.spec
    shape = [f"{k} {getattr(cfg, k)}" for k in ("width", "depth") if spec.has(k)]
    return f"{cfg.name} ({', '.join([*shape, f'dropout {cfg.dropout:g}'])})"


def training_text(payload: dict[str, Any]) -> str | None:
    """The training settings that shaped the head, and the epoch it was saved at; None for an
    exported model, whose metadata does not keep them."""
    s = payload.get("train_config")
    if not isinstance(s, dict):
        return None
    shown = (  # (setting, how it reads); a checkpoint of an older version may lack some
        ("preset", "preset {}"),
        ("loss", "loss {}"),
        ("class_weights", "class weights {}"),
        ("lr", "AdamW lr {:g}"),
        ("batch_size", "batch {}"),
        ("epochs", "{} epochs"),
        ("seed", "seed {}"),
    )
    text = ", ".join(form.format(s[k]) for k, form in shown if s.get(k) is not None)
    epoch, best = payload.get("epoch"), payload.get("best")
    if epoch is not None:
        text += f"; saved at epoch {epoch}"
        if isinstance(best, dict) and best.get("epoch") == epoch:
            text += f" (best val mIoU {best['val_miou']:.4f})"
    return text


def provenance(ckpt: HeadCheckpoint, weights: BackboneSpec) -> dict[str, str]:
    """The report's and evaluation_metrics.txt's lines about the model, in order. `weights`:
    the backbone the engine ran (its source may differ from the checkpoint's; its sha256 is
    the checkpoint's, or the engine would have refused it)."""
    lines = {
        "backbone": ckpt.backbone.describe(),
        "backbone weights": weights_text(weights),
        "head model": head_text(ckpt.head_config),
    }
    training = training_text(ckpt.payload)
    if training:
        lines["training"] = training
    return lines
