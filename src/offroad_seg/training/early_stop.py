"""Early stopping, for `train --patience N`: a run ends once its validation mIoU has not
improved for N epochs, the best epoch's head already saved.

The decision is a function of the best epoch so far (the one the saved head comes from) and
the current epoch, both in last.pth, so a resumed run stops exactly where an uninterrupted one
would, and a run that stopped early resumes to nothing left to train.
"""

from __future__ import annotations

from dataclasses import dataclass

from offroad_seg.errors import ConfigError


@dataclass(frozen=True)
class EarlyStopping:
    patience: int  # epochs without a better val mIoU before the run stops; 0: never

    def __post_init__(self) -> None:
        if self.patience < 0:
            raise ConfigError(f"--patience {self.patience}: must be >= 0 (0: off)")

    def should_stop(self, epoch: int, best: dict | None) -> bool:
        """Whether the run ends after `epoch`, given the best epoch's history row so far
        (None: no validation, nothing to stop on)."""
        return self.patience > 0 and best is not None and epoch - best["epoch"] >= self.patience

    def reason(self, epoch: int, best: dict) -> str:
        return (
            f"stopped early after epoch {epoch}: val mIoU has not improved for "
            f"{epoch - best['epoch']} epochs (--patience {self.patience}; best "
            f"{best['val_miou']:.4f} at epoch {best['epoch']})"
        )
