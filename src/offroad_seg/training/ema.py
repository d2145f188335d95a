"""An exponential moving average (EMA) of a head's weights, for `train --ema DECAY`.

After every optimizer step each floating-point tensor of the head's state (parameters and
buffers, such as a norm's running statistics) moves toward the trained one:
`ema = decay * ema + (1 - decay) * weight`, starting from the head as built. Integer buffers
(counters) are copied. The average is a copy of the head, so validation and checkpoints use it
as a head; the optimizer keeps training the head itself.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from offroad_seg.errors import ConfigError


def check_decay(decay: float) -> None:
    if not 0 <= decay < 1:
        raise ConfigError(f"--ema {decay:g}: the decay must be in [0, 1) (0: off; e.g. 0.999)")


class HeadEMA:
    """The averaged copy of `head` (in eval mode: it is only evaluated and saved)."""

    def __init__(self, head: nn.Module, decay: float) -> None:
        check_decay(decay)
        self.head = head
        self.decay = decay
        self.average = copy.deepcopy(head).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average, after an optimizer step of the head."""
        trained = self.head.state_dict()
        for name, value in self.average.state_dict().items():
            if value.is_floating_point():
                value.lerp_(trained[name].to(value.dtype), 1.0 - self.decay)
            else:
                value.copy_(trained[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.average.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.average.load_state_dict(state)
