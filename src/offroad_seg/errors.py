"""User-facing errors: the CLI prints their message as one line and exits non-zero."""

from __future__ import annotations


class OffroadSegError(Exception):
    """An error caused by input or settings, explained in one line that names the culprit."""


class DataError(OffroadSegError):
    """A dataset file is missing, unreadable or inconsistent."""


class CacheError(OffroadSegError):
    """A feature cache is missing, incompatible, unfinished or corrupt."""


class WeightsError(OffroadSegError):
    """Backbone weights cannot be found or are not a checkpoint of the asked variant."""


class ConfigError(OffroadSegError):
    """A setting is invalid (a size that is not a multiple of the patch, an unknown head, ...)."""


class Interrupted(OffroadSegError):
    """Ctrl-C: the message says what was kept and how to continue (exit status 130)."""


class TrainingDiverged(OffroadSegError):
    """The loss became NaN or infinite: training stopped, the last good checkpoint kept."""

    def __init__(self, message: str, epoch: int) -> None:
        super().__init__(message)
        self.epoch = epoch
