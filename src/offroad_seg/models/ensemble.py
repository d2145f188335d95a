"""Ensembles: heads trained on the same features bundled into one checkpoint. At inference the
backbone runs once and the members' probabilities are averaged (`heads.ensemble.EnsembleHead`,
built by `HeadCheckpoint.build`), so evaluate, predict, `Segmenter`, export and info take an
ensemble as they take a head.

Members must share backbone (variant, weights, layers), preprocessing (working size
included) and class map: their tokens and classes must mean the same thing. Heads that tuned
the backbone's last blocks (`train --tune`) may join, from any cached block: the backbone runs
once up to the earliest tuned block, then each tuned member runs its own blocks from there
and the members on pretrained blocks share one copy (`models.tuning.tail_layout`,
`Backbone.set_tails`). Each of those costs its blocks' share of a backbone pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from offroad_seg.errors import ConfigError, OffroadSegError
from offroad_seg.models.checkpoint import (
    ENSEMBLE_KEY,
    HeadCheckpoint,
    file_sha256,
    head_payload,
    load_checkpoint,
    save_checkpoint,
)
from offroad_seg.models.fingerprint import compat_differences


def check_members(members: Sequence[HeadCheckpoint]) -> None:
    """Refuse, in one line naming the heads and the setting, members that cannot be averaged."""
    if not members:
        raise ConfigError("an ensemble needs at least one head")
    first = members[0]
    for ckpt in members:
        if ckpt.is_ensemble:
            raise OffroadSegError(
                f"{ckpt.path}: is an ensemble already; give its member heads instead"
            )
        diff = compat_differences(_described(first), _described(ckpt))
        if diff:
            raise OffroadSegError(
                f"{ckpt.path} and {first.path} cannot be ensembled: they differ in "
                f"{'; '.join(diff[:3])}"
            )


def _described(ckpt: HeadCheckpoint):
    # the block a head was trained from is the member's own business (`tail_layout`)
    return replace(ckpt.backbone, block=None), ckpt.preprocessing, ckpt.class_map


def _member_entry(ckpt: HeadCheckpoint) -> dict[str, Any]:
    """What an ensemble records of a member: enough to rebuild it and to say where it came
    from and how it scored."""
    payload = ckpt.payload
    return {
        "head_config": ckpt.head_config.to_dict(),
        "tuning": payload.get("tuning"),
        "source": str(ckpt.path),
        "source_sha256": file_sha256(ckpt.path),
        "best": payload.get("best"),
        "train_sizes": payload.get("train_sizes"),
        "train_config": payload.get("train_config"),
    }


def ensemble_payload(members: Sequence[HeadCheckpoint], **extra: Any) -> dict[str, Any]:
    """The checkpoint of the members as one model (see `models.checkpoint`)."""
    check_members(members)
    first = members[0]
    backbone, preprocessing, class_map = _described(first)
    state = {
        f"members.{i}.{name}": tensor
        for i, ckpt in enumerate(members)
        for name, tensor in ckpt.payload["state_dict"].items()
    }
    return {
        **head_payload(first.head_config, class_map, backbone, preprocessing),
        ENSEMBLE_KEY: [_member_entry(ckpt) for ckpt in members],
        "state_dict": state,
        **extra,
    }


def write_ensemble(
    heads: Sequence[str | Path], out: str | Path, overwrite: bool = False, **extra: Any
) -> HeadCheckpoint:
    """Bundle the head checkpoints `heads` into the ensemble checkpoint `out` (written
    atomically); returns it loaded. An existing `out` is replaced only with `overwrite`, and
    never when it is one of the heads."""
    out = Path(out)
    paths = [Path(h) for h in heads]
    if any(out.resolve() == p.resolve() for p in paths):
        raise ConfigError(f"{out}: is one of the heads; write the ensemble to another file")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out}: exists; pass --overwrite to replace it")
    members = [load_checkpoint(p) for p in paths]
    save_checkpoint(out, ensemble_payload(members, **extra))
    return load_checkpoint(out)
