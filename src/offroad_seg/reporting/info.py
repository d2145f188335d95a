"""`offroad-seg info`: what a head checkpoint is, readable without torch.load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from offroad_seg.models.checkpoint import HeadCheckpoint, load_checkpoint
from offroad_seg.models.heads import TUNABLE, get_head_spec
from offroad_seg.models.tuning import TuneSpec

# A run's settings that say how a machine ran it or where its files went, not what was trained.
_BOOKKEEPING = ("out", "progress", "resume", "overwrite")


# Settings only a run tuning the backbone's last blocks uses, by its --tune value
_TUNING_ONLY = {
    None: ("lora_rank", "lora_alpha", "backbone_lr", "checkpointing"),
    "full": ("lora_rank", "lora_alpha"),
}
_ZERO_IS_OFF = ("patience", "ema")  # 0 turns them off


def trained_settings(ckpt: HeadCheckpoint) -> dict[str, Any]:
    """What a head was trained with, as built: its training settings with the head's own
    settings resolved (width 96, not the 0 that asked for the default) and only those the
    head has (a linear head has no width), settings left unset (None) and bookkeeping out."""
    saved = ckpt.payload.get("train_config", {})
    settings = {
        k: v for k, v in saved.items() if v is not None and k not in (*_BOOKKEEPING, *TUNABLE)
    }
    for name in _TUNING_ONLY.get(saved.get("tune"), ()):  # what a run without it never used
        settings.pop(name, None)
    for name in _ZERO_IS_OFF:
        if settings.get(name) == 0:
            settings[name] = False  # shown as "off"
    settings["head"] = ckpt.head_config.name
    head_at = list(settings).index("head") + 1  # the head's settings right after its name
    items = list(settings.items())
    return dict(items[:head_at] + list(ckpt.head_config.settings().items()) + items[head_at:])


def head_info(path: str | Path) -> dict[str, Any]:
    """A JSON-ready summary of a head checkpoint: backbone, head, preprocessing, classes,
    training settings, the epoch it is from, and its best validation metrics; the sizes it was
    trained at; an ensemble's members."""
    ckpt = load_checkpoint(path)
    payload = ckpt.payload
    val = payload.get("val_metrics")
    return {
        "path": str(ckpt.path),
        "backbone": ckpt.backbone.to_dict(),
        "head": ckpt.head_config.to_dict(),
        "preprocessing": ckpt.preprocessing.to_dict(),
        "classes": ckpt.class_map.names,
        "settings": trained_settings(ckpt),
        "epoch": payload.get("epoch"),
        "best": payload.get("best"),
        "per_class_iou": {k: v["iou"] for k, v in val["per_class"].items()} if val else None,
        "compat_fingerprint": ckpt.compat_fingerprint,
        "train_sizes": payload.get("train_sizes"),
        "ensemble": _members(ckpt) if ckpt.is_ensemble else None,
        "ensemble_val": payload.get("ensemble_val"),  # sweep --ensemble-top scores it
        "tuning": _tuning(ckpt),
    }


def _members(ckpt: HeadCheckpoint) -> list[dict[str, Any]]:
    """An ensemble's members: head settings, tuning, source and best validation mIoU."""
    depth = ckpt.backbone.variant.depth
    return [
        {
            "head": m["head_config"],
            "tuning": None if spec is None else _described(spec, depth),
            "source": m.get("source"),
            "val_miou": (m.get("best") or {}).get("val_miou"),
        }
        for m, spec in zip(ckpt.payload["ensemble"], ckpt.member_tunings, strict=True)
    ]


def _tuning(ckpt) -> dict[str, Any] | None:
    """A tuned head's tuning (mode, block, rank, alpha), its description and the number of
    backbone values the checkpoint holds; None for a plain head."""
    spec = ckpt.tuning
    if spec is None:
        return None
    state = ckpt.payload["state_dict"]
    stored = sum(t.numel() for k, t in state.items() if not k.startswith("head."))
    return {**_described(spec, ckpt.backbone.variant.depth), "backbone_values": stored}


def _described(spec: TuneSpec, depth: int) -> dict[str, Any]:
    """A tuning as info shows it: mode, block, rank, alpha and their description."""
    return {**spec.to_dict(), "describe": spec.describe(depth)}


def setting_text(value: Any) -> str:
    """A setting as a user would type it: 0.0003, off, a.zarr,b.zarr (no Python reprs)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(setting_text(v) for v in value)
    return str(value)


def _model_text(head: dict[str, Any]) -> str:
    """'upnext (width 96, depth 2, dropout 0.1)': the head with only the settings it has."""
    settings = ", ".join(
        f"{k} {setting_text(head[k])}" for k in get_head_spec(head["name"]).settings
    )
    return f"{head['name']} ({settings})"


def _tuning_lines(tuning: dict[str, Any] | None) -> list[str]:
    if tuning is None:
        return []
    values = tuning["backbone_values"]
    return [f"tuned        {tuning['describe']} ({values:,} backbone values in the file)"]


def head_info_text(info: dict[str, Any]) -> str:
    bb, head, prep = info["backbone"], info["head"], info["preprocessing"]
    head_settings = {k: head[k] for k in get_head_spec(head["name"]).settings}
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
            source = f"from {member['source']}"
            tuned = f"{member['tuning']['describe']}; " if member.get("tuning") else ""
            lines.append(f"  member {i}   {_model_text(member['head'])}; {tuned}{score}{source}")
        if info.get("ensemble_val"):
            lines.append(f"ensemble val mIoU {info['ensemble_val']['val_miou']:.4f}")
    else:
        lines.append(f"model        {_model_text(head)}")
    lines.append(f"classes      {', '.join(info['classes'])}")
    settings = {k: v for k, v in info["settings"].items() if k not in head_settings}
    settings.pop("head", None)  # on the model line, with its settings
    if settings:
        lines.append(
            "settings     " + ", ".join(f"{k} {setting_text(v)}" for k, v in settings.items())
        )
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
