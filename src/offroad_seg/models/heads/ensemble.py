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
    log-softmax, with the member's argmax."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [member(x).float() for member in self.members]
        rows = max(o.shape[-2] for o in outputs)
        cols = max(o.shape[-1] for o in outputs)
        log_probs = []
        for o in outputs:
            if o.shape[-2:] != (rows, cols):
                o = F.interpolate(o, size=(rows, cols), mode="bilinear", align_corners=False)
            log_probs.append(F.log_softmax(o, dim=1))
        # log(mean(p_i)) = logsumexp(log p_i) - log n: no probability underflows to log(0)
        return torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(log_probs))
