"""TensorBoard logging of a run's training curves, for `train --tensorboard DIR` (optional:
the `tensorboard` package, `pip install 'offroad-seg[tensorboard]'`).

Every epoch's history row becomes scalars at step = epoch: `train/loss`, `val/loss`,
`val/miou`, `val/dice`, `val/pixel_acc`, `val/hackathon_miou`, ..., `lr` and `seconds`.
A resumed run writes into the same folder and drops what an interrupted session logged after
its last saved epoch (TensorBoard's `purge_step`), so the curves show each epoch once.
"""

from __future__ import annotations

from pathlib import Path

from offroad_seg.errors import ConfigError

INSTALL_HINT = "pip install 'offroad-seg[tensorboard]' (or pip install tensorboard)"


def check_available() -> None:
    """Refuse --tensorboard before any work when the package is missing, in one line."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"--tensorboard needs the tensorboard package, which is not installed: {INSTALL_HINT}"
        ) from None


def scalar_tag(key: str) -> str:
    """A history key as a TensorBoard tag: train_loss -> train/loss, val_miou -> val/miou."""
    prefix, sep, rest = key.partition("_")
    return f"{prefix}/{rest}" if sep and prefix in ("train", "val") else key


class CurveLog:
    """The event files of one training session in `folder`; a no-op without a folder."""

    def __init__(self, folder: Path | None, first_epoch: int) -> None:
        self.writer = None
        if folder is not None:
            check_available()
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder), purge_step=first_epoch)

    def epoch(self, row: dict) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(scalar_tag(key), value, row["epoch"])
        self.writer.flush()  # an interrupted run keeps every epoch it saved

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
