"""`offroad-seg info`: what a head checkpoint is, readable without torch.load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from offroad_seg.models.checkpoint import load_checkpoint


def head_info(path: str | Path) -> dict[str, Any]:
    """A JSON-ready summary of a head checkpoint: backbone, head, preprocessing, classes,
    training settings, the epoch it is from, and its best validation metrics."""
    ckpt = load_checkpoint(path)
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
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def head_info_text(info: dict[str, Any]) -> str:
    bb, head, prep = info["backbone"], info["head"], info["preprocessing"]
    lines = [
        f"head         {info['path']}",
        f"backbone     {bb['name']} layers={bb['layers']} channels={bb['channels']}",
        f"weights      {bb['weights_source']} (sha256 {bb['weights_sha256'][:16]}...)",
        f"size         {prep['size'][0]}x{prep['size'][1]}",
        "model        " + ", ".join(f"{k} {_fmt(v)}" for k, v in head.items()),
        f"classes      {', '.join(info['classes'])}",
    ]
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
