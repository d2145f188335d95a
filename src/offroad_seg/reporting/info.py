"""`offroad-seg info`: what a head checkpoint is, readable without torch.load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from offroad_seg.errors import OffroadSegError
from offroad_seg.models.checkpoint import load_checkpoint

HEAD_FILE = "segmentation_head.pth"


def find_head(path: str | Path) -> Path:
    """A checkpoint path, or a run folder holding segmentation_head.pth."""
    path = Path(path)
    if path.is_dir():
        if not (path / HEAD_FILE).is_file():
            raise OffroadSegError(f"{path}: no {HEAD_FILE} in this folder")
        return path / HEAD_FILE
    return path


def head_info(path: str | Path) -> dict[str, Any]:
    """A JSON-ready summary of a head checkpoint: backbone, head, preprocessing, classes,
    training settings, the epoch it is from, and its best validation metrics; the sizes it was
    trained at; an ensemble's members."""
    ckpt = load_checkpoint(find_head(path))
    payload = ckpt.payload
    val = payload.get("val_metrics")
    return {
        "path": str(ckpt.path),
        "backbone": ckpt.backbone.to_dict(),
        "head": ckpt.head_config.to_dict(),
        "preprocessing": ckpt.preprocessing.to_dict(),
        "classes": ckpt.class_map.names,
        "settings": payload.get("train_config", {}),
        "epoch": payload.get("epoch"),
        "best": payload.get("best"),
        "per_class_iou": {k: v["iou"] for k, v in val["per_class"].items()} if val else None,
        "compat_fingerprint": ckpt.compat_fingerprint,
        "train_sizes": payload.get("train_sizes"),
        "ensemble": _members(payload) if ckpt.is_ensemble else None,
        "ensemble_val": payload.get("ensemble_val"),  # sweep --ensemble-top scores it
        "tuning": _tuning(ckpt),
    }


def _members(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """An ensemble's members: head settings, source and best validation mIoU."""
    return [
        {
            "head": m["head_config"],
            "source": m.get("source"),
            "val_miou": (m.get("best") or {}).get("val_miou"),
        }
        for m in payload["ensemble"]
    ]


def _tuning(ckpt) -> dict[str, Any] | None:
    """A tuned head's tuning (mode, block, rank, alpha), its description and the number of
    backbone values the checkpoint holds; None for a plain head."""
    spec = ckpt.tuning
    if spec is None:
        return None
    state = ckpt.payload["state_dict"]
    stored = sum(t.numel() for k, t in state.items() if not k.startswith("head."))
    depth = ckpt.backbone.variant.depth
    return {**spec.to_dict(), "describe": spec.describe(depth), "backbone_values": stored}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _tuning_lines(tuning: dict[str, Any] | None) -> list[str]:
    if tuning is None:
        return []
    values = tuning["backbone_values"]
    return [f"tuned        {tuning['describe']} ({values:,} backbone values in the file)"]


def head_info_text(info: dict[str, Any]) -> str:
    bb, head, prep = info["backbone"], info["head"], info["preprocessing"]
    lines = [
        f"head         {info['path']}",
        f"backbone     {bb['name']} layers={bb['layers']} channels={bb['channels']}",
        f"weights      {bb['weights_source']} (sha256 {bb['weights_sha256'][:16]}...)",
        f"size         {prep['size'][0]}x{prep['size'][1]}",
        *_tuning_lines(info.get("tuning")),
    ]
    sizes = info.get("train_sizes") or []
    if len(sizes) > 1:
        lines.append("trained at   " + ", ".join(f"{r}x{c}" for r, c in sizes))
    if info.get("ensemble"):
        lines.append(f"ensemble     {len(info['ensemble'])} heads, probabilities averaged")
        for i, member in enumerate(info["ensemble"]):
            miou = member["val_miou"]
            score = f"val mIoU {miou:.4f}, " if miou is not None else ""
            settings = ", ".join(f"{k} {_fmt(v)}" for k, v in member["head"].items())
            lines.append(f"  member {i}   {settings} ({score}from {member['source']})")
        if info.get("ensemble_val"):
            lines.append(f"ensemble val mIoU {info['ensemble_val']['val_miou']:.4f}")
    else:
        lines.append("model        " + ", ".join(f"{k} {_fmt(v)}" for k, v in head.items()))
    lines.append(f"classes      {', '.join(info['classes'])}")
    settings = info["settings"]
    if settings:
        shown = {k: v for k, v in settings.items() if k not in ("progress", "resume", "overwrite")}
        lines.append("settings     " + ", ".join(f"{k} {_fmt(v)}" for k, v in shown.items()))
    if info["epoch"] is not None:
        lines.append(f"epoch        {info['epoch']}")
    best = info["best"]
    if best:
        lines.append(
            f"best         epoch {best['epoch']}: val mIoU {best['val_miou']:.4f}, "
            f"Dice {best['val_dice']:.4f}, pixel accuracy {best['val_pixel_acc']:.4f}, "
            f"loss {best['val_loss']:.4f}"
        )
    if info["per_class_iou"]:
        iou = ", ".join(
            f"{name} {'-' if v is None else f'{v:.3f}'}"
            for name, v in info["per_class_iou"].items()
        )
        lines.append(f"class IoU    {iou}")
    return "\n".join(lines)
