"""Low-rank adapters (LoRA) on a backbone's linear layers, and merging them back.

`LoRALinear` wraps a frozen `nn.Linear` W and adds `scale * B A x` (A: rank x in, B: out x
rank, scale = alpha / rank). B starts at zero, so an adapted block computes exactly what the
frozen one does until training moves it; `merged()` folds `scale * B A` into W, which is what
inference and ONNX export run (one matrix product per layer, as before tuning).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        dd = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **dd))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **dd))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear's own weights

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """W x + b + scale * B A x; `bias` replaces the base layer's own (DINOv3's qkv bias
        is assembled with its key part masked)."""
        b = self.base.bias if bias is None else bias
        update = F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale
        return F.linear(x, self.base.weight, b) + update

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The plain linear layer with the update folded into its weight."""
        base = self.base
        layer = nn.Linear(
            base.in_features, base.out_features, bias=base.bias is not None,
            device=base.weight.device, dtype=base.weight.dtype,
        )  # fmt: skip
        delta = (self.lora_b.float() @ self.lora_a.float()) * self.scale
        layer.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
        if base.bias is not None:
            layer.bias.copy_(base.bias)
        return layer.requires_grad_(False)


def linear(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`layer` applied to x with `bias` instead of its own: a plain `nn.Linear` or a
    `LoRALinear` (the DINOv3 attention's masked qkv bias)."""
    if isinstance(layer, LoRALinear):
        return layer(x, bias)
    return F.linear(x, layer.weight, bias)


def adapted_linears(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every linear layer of a block's attention and MLP: qkv and
    proj, fc1 and fc2 (SwiGLU variants: each of their MLP's linear layers)."""
    out = []
    for part in (block.attn, block.mlp):
        for parent in part.modules():
            for name, child in parent.named_children():
                if isinstance(child, (nn.Linear, LoRALinear)):
                    out.append((parent, name))
    return out


def add_lora(blocks: nn.ModuleList | list[nn.Module], rank: int, alpha: float) -> None:
    """Wrap every adapted linear layer of `blocks` in a `LoRALinear` (in place)."""
    for block in blocks:
        for parent, name in adapted_linears(block):
            layer = getattr(parent, name)
            if isinstance(layer, nn.Linear):
                setattr(parent, name, LoRALinear(layer, rank, alpha))


def merge_lora(module: nn.Module) -> None:
    """Replace every `LoRALinear` under `module` by its merged plain layer (in place)."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
