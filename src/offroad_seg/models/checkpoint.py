"""Self-contained head checkpoints: writing and reading.

A `segmentation_head.pth` is enough to use a head on its own: head config and weights, class
map, backbone spec with the weights' sha256, preprocessing, training settings and metrics. A
head tuned from a block cache also holds `tuning` (`models.tuning.TuneSpec`) and, in its state
dict beside the head's `head.` entries, what it changed in the backbone: the LoRA adapters and
the final norm, or the tuned blocks (`blocks.` numbered from the cached block) and the norm.
`last.pth` adds the optimizer, RNG states and history that `--resume` needs. Every tensor is
saved on the CPU, so a checkpoint written on a GPU loads anywhere with a plain `torch.load`.

An ensemble (`models.ensemble`) is a head checkpoint too: its `ensemble` entry lists the
members (their head configs, tuning and where they came from), its weights are the members'
state dicts under `members.<i>.` (a tuned member's blocks and norm included),
`head_config` is its first member's, and `build` makes an `EnsembleHead`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from offroad_seg.core.atomic import atomic_write
from offroad_seg.data.classes import ClassMap
from offroad_seg.data.dataset import IMAGES_DIR, MASKS_DIR
from offroad_seg.errors import OffroadSegError
from offroad_seg.models.backbone import BackboneSpec
from offroad_seg.models.fingerprint import compat_fingerprint
from offroad_seg.models.heads import HeadConfig, build_head
from offroad_seg.models.heads.ensemble import EnsembleHead
from offroad_seg.models.preprocess import Preprocessing
from offroad_seg.models.tuning import TuneSpec, head_state, tail_layout
from offroad_seg.models.weights import load_tensors, not_a_checkpoint


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (a head checkpoint or an exported model), read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


FORMAT = "offroad-seg-head"
VERSION = 1
HEAD_FILE = "segmentation_head.pth"  # a run folder's head (best epoch)
_LAST_FILE = "last.pth"  # training's resumable state, written before the head

EXPECTED_HEAD = f"a head checkpoint (.pth), an exported model (.onnx) or a run folder ({HEAD_FILE})"


def resolve_head(path: str | Path) -> Path:
    """The head file a user means: a file as given, or a run folder's segmentation_head.pth.
    The one place a head argument is resolved (info, compare, evaluate, predict, export and
    Segmenter all read heads through it); a folder that is something else (a dataset, a
    feature cache, a sweep, an unfinished run) is named as such, in one line."""
    path = Path(path)
    if not path.is_dir():
        return path
    if (path / HEAD_FILE).is_file():
        return path / HEAD_FILE
    raise OffroadSegError(f"{path}: {_folder_kind(path)}, where {EXPECTED_HEAD} is expected")


def looks_like_head(path: str | Path) -> bool:
    """A head file (.pth, .pt, .onnx) or a run folder, by names only: for saying so when one is
    given where something else (a dataset) is expected."""
    path = Path(path)
    if path.is_dir():
        return (path / HEAD_FILE).is_file()
    return path.is_file() and path.suffix.lower() in (".pth", ".pt", ".onnx")


def expect_dataset(path: str | Path) -> None:
    """Refuse a head given where a dataset folder is expected (swapped arguments), in one line."""
    if looks_like_head(path):
        raise OffroadSegError(
            f"{path}: a head, where a dataset folder ({IMAGES_DIR}/, {MASKS_DIR}/) is expected"
        )


def _folder_kind(path: Path) -> str:
    """What a folder without a head looks like, by its entries' names (nothing is read)."""
    if (path / IMAGES_DIR).is_dir() or (path / MASKS_DIR).is_dir():
        return f"a dataset folder ({IMAGES_DIR}/, {MASKS_DIR}/)"
    if (path / "zarr.json").is_file() or (path / ".zgroup").is_file():
        return "a feature cache"
    if (path / "best" / HEAD_FILE).is_file():
        return f"a sweep folder (its best run is {path / 'best'})"
    if (path / _LAST_FILE).is_file():
        return f"a run folder whose training has not finished (no {HEAD_FILE} yet)"
    return f"a folder with no {HEAD_FILE}"


def to_cpu(obj: Any) -> Any:
    """The same nested dicts, lists and tuples with every tensor moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def head_payload(
    head_config: HeadConfig,
    class_map: ClassMap,
    backbone: BackboneSpec,
    preprocessing: Preprocessing,
    **extra: Any,
) -> dict[str, Any]:
    """The part of a checkpoint that describes a head and what it expects as input."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "head_config": head_config.to_dict(),
        "class_map": class_map.to_dict(),
        "backbone": backbone.to_dict(),
        "preprocessing": preprocessing.to_dict(),
        "compat_fingerprint": compat_fingerprint(backbone, preprocessing, class_map),
        **extra,
    }


DIGEST_KEY = "state_dict_sha256"
ENSEMBLE_KEY = "ensemble"  # an ensemble's members: [{"head_config", "source", ...}, ...]


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in name order: a flipped byte in
    a checkpoint's weights changes it, and so does a renamed, retyped or reshaped tensor."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically, with every tensor on the CPU and the digest of its
    weights (computed afresh: a payload edited since it was loaded gets its own)."""
    payload = to_cpu(payload)
    if isinstance(payload.get("state_dict"), dict):
        payload = {**payload, DIGEST_KEY: state_dict_sha256(payload["state_dict"])}
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
    members: tuple[HeadConfig, ...] = ()  # an ensemble's heads; () for a single head

    @property
    def compat_fingerprint(self) -> str:
        return compat_fingerprint(self.backbone, self.preprocessing, self.class_map)

    @property
    def is_ensemble(self) -> bool:
        return bool(self.members)

    @property
    def tuning(self) -> TuneSpec | None:
        """How the blocks after the cached one were trained (heads from block caches), with
        their weights in the state dict beside the head's; None for a plain head."""
        tuning = self.payload.get("tuning")
        return None if tuning is None else TuneSpec.from_dict(tuning)

    @property
    def member_tunings(self) -> tuple[TuneSpec | None, ...]:
        """An ensemble's members' `tuning`, in member order; () for a single head."""
        entries = self.payload.get(ENSEMBLE_KEY) or ()
        return tuple(
            None if e.get("tuning") is None else TuneSpec.from_dict(e["tuning"]) for e in entries
        )

    def member_states(self) -> list[dict[str, torch.Tensor]]:
        """An ensemble's members' state dicts, as each member's checkpoint holds it."""
        state = self.payload["state_dict"]
        out = []
        for i in range(len(self.members)):
            prefix = f"members.{i}."
            out.append({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        return out

    def tail_layout(self) -> tuple[int, tuple[int, ...]] | None:
        """Where an ensemble's members branch off the backbone (`models.tuning.tail_layout`);
        None for a single head, or an ensemble of heads on pretrained blocks."""
        return tail_layout(self.member_tunings) if self.members else None

    def build(self, device: torch.device | str = "cpu") -> nn.Module:
        """The head (an `EnsembleHead` of the members for an ensemble) with its weights, in
        eval mode: the one place a checkpoint becomes a module. A tuned head's (or tuned
        member's) blocks are not part of it: `models.segmentation.backbone_for_head` loads
        them into the backbone."""
        if self.members:
            layout = self.tail_layout()
            head = EnsembleHead(
                [build_head(c) for c in self.members], None if layout is None else layout[1]
            )
            state = {}
            members = zip(self.member_tunings, self.member_states(), strict=True)
            for i, (spec, own) in enumerate(members):
                own = own if spec is None else head_state(own)  # a tuned member's head part
                state.update({f"members.{i}.{k}": v for k, v in own.items()})
        else:
            head = build_head(self.head_config)
            state = self.payload["state_dict"]
            if self.tuning is not None:
                state = head_state(state)
        try:
            head.load_state_dict(state)
        except (KeyError, RuntimeError) as e:  # torch lists every mismatch, one per line
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            detail = lines[1] if len(lines) > 1 else lines[0] if lines else repr(e)
            detail = detail if len(detail) <= 200 else detail[:200] + "..."
            raise OffroadSegError(
                f"{self.path}: its weights do not fit its head config "
                f"({self.head_config.name}): {detail}"
            ) from e
        return head.to(device).eval()


def load_checkpoint(path: str | Path) -> HeadCheckpoint:
    """A head checkpoint, or a run folder's (`resolve_head`), read and checked."""
    path = resolve_head(path)
    if not path.is_file():
        raise OffroadSegError(f"{path}: head checkpoint not found")
    try:
        payload = load_tensors(path)
    except Exception as e:
        raise OffroadSegError(not_a_checkpoint(path, "head checkpoint")) from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise OffroadSegError(f"{path}: not an offroad-seg head checkpoint")
    if payload.get("version") != VERSION:
        raise OffroadSegError(
            f"{path}: head checkpoint version {payload.get('version')}; this tool reads {VERSION}"
        )
    check_weights(path, payload)
    try:
        backbone = BackboneSpec.from_dict(payload["backbone"])
        entries = payload.get(ENSEMBLE_KEY) or ()
        members = tuple(HeadConfig.from_dict(m["head_config"]) for m in entries)
    except OffroadSegError as e:
        raise OffroadSegError(f"{path}: {e}") from e
    return HeadCheckpoint(
        path=path,
        head_config=HeadConfig.from_dict(payload["head_config"]),
        class_map=ClassMap.from_dict(payload["class_map"]),
        backbone=backbone,
        preprocessing=Preprocessing.from_dict(payload["preprocessing"]),
        payload=payload,
        members=members,
    )


def check_weights(path: Path, payload: dict[str, Any]) -> None:
    """Refuse weights that are not what was saved (their digest differs: the file was damaged
    or edited) or that are not numbers (a diverged run's NaN/inf). Checkpoints written before
    the digest existed have none and are only checked for finite values."""
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise OffroadSegError(f"{path}: head checkpoint has no weights (state_dict)")
    stored = payload.get(DIGEST_KEY)
    if stored is not None and stored != state_dict_sha256(state):
        raise OffroadSegError(
            f"{path}: the head weights do not match the digest saved with them (the file is "
            "damaged or was edited); use an intact copy or train again"
        )
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise OffroadSegError(
                f"{path}: weight {name} holds NaN or inf values (a diverged run); "
                "train again with a lower --lr"
            )
