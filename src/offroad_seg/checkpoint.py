"""Self-contained head checkpoints and atomic file writes.

A `segmentation_head.pth` is enough to use a head on its own: head config and weights, class
map, backbone spec with the weights' sha256, preprocessing, training settings and metrics.
`last.pth` adds the optimizer, RNG states and history that `--resume` needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from offroad_seg.atomic import atomic_write
from offroad_seg.backbone import BackboneSpec
from offroad_seg.cache import compat_fingerprint
from offroad_seg.data import ClassMap
from offroad_seg.errors import OffroadSegError
from offroad_seg.heads import HeadConfig, build_head
from offroad_seg.preprocess import Preprocessing

FORMAT = "offroad-seg-head"
VERSION = 1


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(payload, f))


@dataclass
class HeadCheckpoint:
    """A loaded head checkpoint: everything needed to rebuild and check a head."""

    path: Path
    head_config: HeadConfig
    class_map: ClassMap
    backbone: BackboneSpec
    preprocessing: Preprocessing
    payload: dict[str, Any]

    @property
    def compat_fingerprint(self) -> str:
        return compat_fingerprint(self.backbone, self.preprocessing, self.class_map)

    def build(self, device: torch.device | str = "cpu") -> nn.Module:
        head = build_head(self.head_config)
        head.load_state_dict(self.payload["state_dict"])
        return head.to(device).eval()


def load_checkpoint(path: str | Path) -> HeadCheckpoint:
    path = Path(path)
    if not path.is_file():
        raise OffroadSegError(f"{path}: head checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise OffroadSegError(f"{path}: cannot read head checkpoint ({type(e).__name__})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise OffroadSegError(f"{path}: not an offroad-seg head checkpoint")
    if payload.get("version") != VERSION:
        raise OffroadSegError(
            f"{path}: head checkpoint version {payload.get('version')}; this tool reads {VERSION}"
        )
    return HeadCheckpoint(
        path=path,
        head_config=HeadConfig.from_dict(payload["head_config"]),
        class_map=ClassMap.from_dict(payload["class_map"]),
        backbone=BackboneSpec.from_dict(payload["backbone"]),
        preprocessing=Preprocessing.from_dict(payload["preprocessing"]),
        payload=payload,
    )
