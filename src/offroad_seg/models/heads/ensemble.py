"""Several heads on one backbone's features as one head: the members' class probabilities
averaged. Not a registry entry (it is not trained): checkpoints that bundle heads
(`models.ensemble`) build it in `HeadCheckpoint.build`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class EnsembleHead(nn.Module):
    """Features (B, C, h, w) -> the log of the mean of the members' softmax probabilities,
    (B, K, H, W) on the finest member grid (a member with a coarser output is upsampled there
    first, bilinearly, as evaluate upsamples any head's logits).

    The output is what the rest of the tool calls logits: its softmax is exactly the members'
    mean probabilities, its argmax their most probable class, and bilinear upsampling keeps
    that argmax (the log-normaliser is shared by every class at each pixel), so evaluate,
    predict, TTA and export run an ensemble as they run a head. One member gives its own
    log-softmax, with the member's argmax.

    `branch_of` (members that tuned the backbone's last blocks, `models.tuning.tail_layout`):
    the features are several branches' concatenated on channels, and member i reads branch
    `branch_of[i]`; None: every member reads all of them (one branch)."""

    def __init__(
        self, members: Sequence[nn.Module], branch_of: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if branch_of is not None and len(branch_of) != len(members):
            raise ValueError(f"{len(branch_of)} branches given for {len(members)} members")
        self.members = nn.ModuleList(members)
        self.branch_of = None if branch_of is None else tuple(int(b) for b in branch_of)

    def _inputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.branch_of is None:
            return [x] * len(self.members)
        width = x.shape[1] // (max(self.branch_of) + 1)
        return [x[:, b * width : (b + 1) * width] for b in self.branch_of]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [m(xi).float() for m, xi in zip(self.members, self._inputs(x), strict=True)]
        rows = max(o.shape[-2] for o in outputs)
        cols = max(o.shape[-1] for o in outputs)
        log_probs = []
        for o in outputs:
            if o.shape[-2:] != (rows, cols):
                o = F.interpolate(o, size=(rows, cols), mode="bilinear", align_corners=False)
            log_probs.append(F.log_softmax(o, dim=1))
        # log(mean(p_i)) = logsumexp(log p_i) - log n: no probability underflows to log(0)
        return torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(log_probs))
