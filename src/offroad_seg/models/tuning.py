"""Tuned backbone blocks: what `train --tune` trains from a block cache and what inference
applies to the backbone.

A block cache (`extract --block K`) stores the tokens entering block K. `TunedModel` maps them
to logits through the backbone's own blocks K..N-1, its final norm and the head, and trains
per `TuneSpec.mode`:

    frozen  the head only (the blocks and norm as pretrained: a plain head, paid per epoch)
    lora    low-rank adapters (`lora.py`) on every block's attention and MLP linear layers,
            plus the final norm and the head
    full    the blocks' and the final norm's weights, plus the head

Its state dict holds only what training changes (the head's weights under `head.`, the
adapters or the blocks under `blocks.` numbered from K, the final norm under `norm.`), so a
LoRA checkpoint stays small; `apply_tuning` loads it into a frozen backbone for inference,
with the adapters merged into the weights (what evaluate, predict, the API and ONNX run).
DINOv3's RoPE jitter (a pretraining augmentation) is never applied: the blocks see the
positions inference sees.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from offroad_seg.errors import ConfigError
from offroad_seg.models.backbone import Backbone, Tail, tokens_from_stored
from offroad_seg.models.lora import add_lora, merge_lora

MODES = ("frozen", "lora", "full")


@dataclass(frozen=True)
class TuneSpec:
    """How the blocks from `block` on were trained (checkpoints carry it as `tuning`)."""

    mode: str  # one of MODES
    block: int  # the first block run from the cache's tokens
    rank: int = 0  # lora only
    alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"tuning {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.mode == "lora" and not (self.rank >= 1 and self.alpha > 0):
            raise ConfigError(f"LoRA rank {self.rank} and alpha {self.alpha}: need >= 1 and > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TuneSpec:
        return cls(d["mode"], int(d["block"]), int(d.get("rank", 0)), float(d.get("alpha", 0)))

    def describe(self, depth: int) -> str:
        last = depth - 1
        blocks = f"blocks {self.block}..{last}" if self.block < last else f"block {last}"
        if self.mode == "lora":
            return f"LoRA rank {self.rank}, alpha {self.alpha:g} on {blocks} + final norm"
        if self.mode == "full":
            return f"{blocks} + final norm fully tuned"
        return f"head on frozen {blocks}"


def prepare_blocks(backbone: Backbone, spec: TuneSpec) -> None:
    """Make blocks spec.block..N-1 and the final norm trainable as `spec.mode` says (adding
    the adapters for LoRA; they draw their initial A from torch's RNG)."""
    vit = backbone.vit
    tail = list(vit.blocks)[spec.block :]
    if spec.mode == "lora":
        add_lora(tail, spec.rank, spec.alpha)
        for block in tail:
            for name, p in block.named_parameters():
                p.requires_grad_(name.endswith(("lora_a", "lora_b")))
    for block in tail:
        if spec.mode == "full":
            block.requires_grad_(True)
    vit.norm.requires_grad_(spec.mode != "frozen")


def saved_entry(mode: str, name: str) -> bool:
    """Whether a tuned model's state-dict entry `name` (`head.`, `blocks.`, `norm.`) is one
    training in `mode` changes, and so one its checkpoint holds."""
    if name.startswith("head."):
        return True
    if mode == "frozen":
        return False
    if mode == "full" or name.startswith("norm."):
        return True
    return name.endswith(("lora_a", "lora_b"))


class TunedModel(nn.Module):
    """Block-cache tokens (B, C, 1, T) -> logits: blocks K..N-1 (tuned per `spec`), the final
    norm and the head, on a rows x cols token grid."""

    def __init__(
        self,
        backbone: Backbone,
        head: nn.Module,
        spec: TuneSpec,
        grid: tuple[int, int],
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        depth = len(backbone.vit.blocks)
        if not 0 <= spec.block <= depth - backbone.spec.layers:
            raise ConfigError(f"block {spec.block}: expected 0 to {depth - backbone.spec.layers}")
        prepare_blocks(backbone, spec)
        self.blocks = nn.ModuleList(list(backbone.vit.blocks)[spec.block :])
        self.norm = backbone.vit.norm
        self.head = head
        self.spec, self.grid, self.checkpointing = spec, tuple(grid), checkpointing
        # not a submodule: the first K blocks and the embeddings stay out of the state dict
        self.__dict__["backbone"] = backbone

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        tokens = tokens_from_stored(stored)
        rows, cols = self.grid
        tuned = self.spec.mode != "frozen"
        with torch.set_grad_enabled(torch.is_grad_enabled() and tuned):
            feats = self.backbone.features_from(
                tokens, self.spec.block, rows, cols, self.checkpointing and self.training
            )
        return self.head(feats)

    def lr_scale(self, name: str, backbone_scale: float) -> float:
        """A parameter's learning rate as a fraction of the head's: the tuned blocks and the
        final norm take `backbone_scale`."""
        return 1.0 if name.startswith("head.") else backbone_scale

    def saved(self, name: str) -> bool:
        """Whether a state-dict entry is one training changes (and a checkpoint holds)."""
        return saved_entry(self.spec.mode, name)

    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        for name in [k for k in full if not self.saved(k[len(prefix) :])]:
            del full[name]
        return full

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign=False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if self.saved(k)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                "Error(s) in loading state_dict for TunedModel:\n"
                f"missing keys: {missing[:5]}\nunexpected keys: {result.unexpected_keys[:5]}"
            )
        return result

    def parameter_counts(self) -> dict[str, int]:
        """Trainable parameters of the blocks and norm, and of the head."""
        tail = sum(p.numel() for n, p in self.named_parameters() if p.requires_grad and not
                   n.startswith("head."))  # fmt: skip
        return {"backbone": tail, "head": sum(p.numel() for p in self.head.parameters())}


def tail_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The blocks' and norm's entries of a tuned checkpoint's state dict."""
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def head_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The head's entries of a tuned checkpoint's state dict, without their `head.` prefix."""
    return {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}


@torch.no_grad()
def load_tail(tail: Tail, spec: TuneSpec, state: Mapping[str, torch.Tensor], merge: bool = True):
    """Load a tuned checkpoint's blocks and norm (`tail_state`) into `tail` (blocks
    spec.block..N-1 and the final norm), in place; LoRA adapters are merged into the weights
    unless `merge=False`. The tail stays frozen (nothing requires gradients)."""
    if tail.start != spec.block:
        raise ValueError(f"a tail from block {tail.start} for blocks tuned from {spec.block}")
    if spec.mode == "lora":
        add_lora(tail.blocks, spec.rank, spec.alpha)
    result = tail.load_state_dict(tail_state(state), strict=False)
    missing = [k for k in result.missing_keys if saved_entry(spec.mode, k)]
    if missing or result.unexpected_keys:
        raise ValueError(f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    if merge:
        merge_lora(tail)
    tail.requires_grad_(False)


def apply_tuning(
    backbone: Backbone, spec: TuneSpec, state: Mapping[str, torch.Tensor], merge: bool = True
) -> None:
    """Load a tuned checkpoint's blocks and norm into a frozen backbone itself (`load_tail`
    on its own blocks)."""
    load_tail(backbone.own_tail(spec.block), spec, state, merge)


def is_tuned(spec: TuneSpec | None) -> bool:
    """Whether a head's blocks differ from the pretrained ones (LoRA or full tuning)."""
    return spec is not None and spec.mode != "frozen"


def member_tail(
    backbone: Backbone, spec: TuneSpec | None, state: Mapping[str, torch.Tensor], start: int
) -> Tail:
    """Blocks `start`..N-1 and the final norm as an ensemble member computes them: the
    backbone's own (shared, not copied) for a head on frozen blocks (`spec` None or frozen),
    else the pretrained blocks before `spec.block` (shared) and copies of the rest with the
    member's tuning loaded (LoRA merged)."""
    own = backbone.own_tail(start)
    if not is_tuned(spec):
        return own
    if spec.block < start:
        raise ValueError(f"blocks tuned from {spec.block}, before the shared block {start}")
    split = spec.block - start
    tuned = copy.deepcopy(Tail(spec.block, list(own.blocks)[split:], own.norm))
    load_tail(tuned, spec, state)
    return Tail(start, [*list(own.blocks)[:split], *tuned.blocks], tuned.norm)


def tail_layout(
    tunings: Sequence[TuneSpec | None], start: int | None = None
) -> tuple[int, tuple[int, ...]] | None:
    """Where an ensemble's members (their `tuning`s) branch off the shared backbone: the first
    block each runs on its own (the earliest tuned one, or `start`) and the branch each member
    reads (`EnsembleHead`'s `branch_of`): the members on pretrained blocks share branch one
    tail; each tuned member has its own. None when no member tuned its blocks and no `start`
    is given: the plain backbone serves them all."""
    tuned = [spec.block for spec in tunings if is_tuned(spec)]
    if start is None:
        if not tuned:
            return None
        start = min(tuned)
    branches: dict[int, int] = {}
    branch_of = [
        branches.setdefault(i if is_tuned(spec) else -1, len(branches))
        for i, spec in enumerate(tunings)
    ]
    return start, tuple(branch_of)


def member_tails(
    backbone: Backbone,
    tunings: Sequence[TuneSpec | None],
    states: Sequence[Mapping[str, torch.Tensor]],
    layout: tuple[int, tuple[int, ...]],
) -> list[Tail]:
    """One `member_tail` per branch of `layout` (`tail_layout`), in branch order."""
    start, branch_of = layout
    firsts = [branch_of.index(b) for b in range(max(branch_of) + 1)]  # each branch's first member
    return [member_tail(backbone, tunings[i], states[i], start) for i in firsts]


class TailsModel(nn.Module):
    """Block-cache tokens (B, C, 1, T) -> a head's logits on the features of the backbone's
    tails (`Backbone.set_tails`, which start at the cached block), on a rows x cols grid:
    an ensemble of heads trained on a block cache, scored on the cache."""

    def __init__(self, backbone: Backbone, head: nn.Module, grid: tuple[int, int]) -> None:
        super().__init__()
        self.backbone, self.head, self.grid = backbone, head, tuple(grid)

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.tails_features(tokens_from_stored(stored), *self.grid))
