"""What a sweep searches: the settings it may vary and their values from the command line
(--grid, --range, --choice), Optuna's distributions and the grid's points, the sampler that
makes a sampled trial's settings a function of the seed and its sample index, and the run
folder name that says what a trial is."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from offroad_seg.config import RUN_SETTINGS, SweepConfig, TrainConfig, default
from offroad_seg.errors import ConfigError

SWEEPABLE = tuple(name for name in RUN_SETTINGS if name != "preset")


def parse_value(name: str, text: str) -> Any:
    """A setting's value from text, in the type of its TrainConfig field."""
    if name not in SWEEPABLE:
        raise ConfigError(f"{name!r} cannot be swept; settings: {', '.join(SWEEPABLE)}")
    text = text.strip()
    try:
        if name in ("dropout", "backbone_lr"):  # None by default: float when given
            return float(text)
        kind = type(default(TrainConfig, name))
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError as e:
        raise ConfigError(f"{name}={text!r}: expected a number") from e
    if name == "loss":
        from offroad_seg.training.losses import LossSpec

        return str(LossSpec.parse(text))
    if name == "head":
        from offroad_seg.models.heads import get_head_spec

        return get_head_spec(text).name
    return text


def parse_grid(items: tuple[str, ...]) -> dict[str, list]:
    """`lr=1e-4,3e-4` (values may be separated by ';' when they hold commas, as class weights
    do: `class_weights=auto;none`) -> {"lr": [1e-4, 3e-4]}."""
    grid: dict[str, list] = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not values:
            raise ConfigError(f"--grid {item!r}: expected NAME=V1,V2,...")
        if name in grid:
            raise ConfigError(f"--grid {name}: given twice")
        texts = values.split(";") if ";" in values else values.split(",")
        grid[name] = [parse_value(name, t) for t in texts]
    return grid


@dataclass(frozen=True)
class Range:
    name: str
    low: float
    high: float
    scale: str  # "linear", "log" or "int"


def parse_range(item: str) -> Range:
    """`lr=1e-5:1e-2:log`, `width=32:256:int`, `dropout=0:0.3`."""
    name, sep, spec = item.partition("=")
    name = name.strip().replace("-", "_")
    parts = spec.split(":")
    if not sep or len(parts) not in (2, 3):
        raise ConfigError(f"--range {item!r}: expected NAME=LOW:HIGH[:log|int]")
    parse_value(name, parts[0])  # a sweepable name
    scale = parts[2] if len(parts) == 3 else "linear"
    if scale not in ("linear", "log", "int"):
        raise ConfigError(f"--range {item!r}: the scale is linear, log or int")
    low, high = float(parts[0]), float(parts[1])
    if not low < high or (scale == "log" and low <= 0):
        raise ConfigError(f"--range {item!r}: needs LOW < HIGH (and LOW > 0 for log)")
    return Range(name, low, high, scale)


def trial_slug(params: dict[str, Any], index: int | None = None) -> str:
    """A run folder name that says what the trial is, the same for the same settings; a
    sampled trial's starts with its sample index, so two samples never share a folder."""
    text = ",".join(f"{k}={format_value(v)}" for k, v in sorted(params.items()))
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:6]
    safe = re.sub(r"[^A-Za-z0-9=.,+-]+", "_", text)[:80]
    slug = f"{safe}-{digest}" if safe else digest
    return slug if index is None else f"{index:03d}-{slug}"


# How trial_slug names a folder: what --overwrite may remove when the study cannot say.
SLUG_PATTERN = re.compile(r"^[A-Za-z0-9=.,+_-]*[0-9a-f]{6}$")


def format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def param_distributions(cfg: SweepConfig) -> dict[str, Any]:
    import optuna.distributions as d

    out: dict[str, Any] = {}
    for name, values in parse_grid(cfg.grid).items():
        out[name] = d.CategoricalDistribution(values)
    for name, values in parse_grid(cfg.choices).items():
        out[name] = d.CategoricalDistribution(values)
    for r in map(parse_range, cfg.ranges):
        if r.scale == "int":
            out[r.name] = d.IntDistribution(int(r.low), int(r.high))
        else:
            out[r.name] = d.FloatDistribution(r.low, r.high, log=r.scale == "log")
    return out


def grid_points(cfg: SweepConfig) -> list[dict[str, Any]]:
    grid = parse_grid(cfg.grid)
    points: list[dict[str, Any]] = [{}]
    for name, values in grid.items():
        points = [{**p, name: v} for p in points for v in values]
    return points


SAMPLE = "sample"  # a sampled trial's user attr: its sample index, 0, 1, ...


def _sample_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"offroad-seg sweep {seed} {index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seeded_sampler(seed: int):
    """Optuna's TPE, its random stream started afresh for each sample index from the seed:
    a sample's settings depend on the seed, its index and the trials finished before it, not
    on the process or on restarts (one TPE stream per process would repeat its first draws
    after every restart)."""
    import optuna

    class SampleSeededTPE(optuna.samplers.BaseSampler):
        def __init__(self) -> None:
            self._by_trial: dict[int, optuna.samplers.TPESampler] = {}

        def _tpe(self, trial) -> optuna.samplers.TPESampler:
            """The trial's TPE (one stream for all its settings), seeded by its index."""
            if trial.number not in self._by_trial:
                index = int(trial.user_attrs.get(SAMPLE, trial.number))
                tpe = optuna.samplers.TPESampler(seed=_sample_seed(seed, index))
                self._by_trial[trial.number] = tpe
            return self._by_trial[trial.number]

        def infer_relative_search_space(self, study, trial) -> dict:
            return {}  # independent sampling, as TPE's default

        def sample_relative(self, study, trial, search_space) -> dict:
            return {}

        def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
            tpe = self._tpe(trial)
            return tpe.sample_independent(study, trial, param_name, param_distribution)

    return SampleSeededTPE()


def sample_index(study, trial) -> int:
    """A fresh sampled trial's index: the fresh trials numbered before it (a restarted
    trial, enqueued, carries its original's). Trial numbers come from the storage, so
    processes on several machines never get the same index."""
    return sum(
        1
        for t in study.get_trials(deepcopy=False)
        if t.number < trial.number and not t.user_attrs.get("queued")
    )


def suggest(trial, name: str, dist) -> Any:
    """The trial's value of a setting (a queued trial's fixed value, or a sample)."""
    import optuna.distributions as d

    if isinstance(dist, d.CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, d.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high)
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log)


def check_search(cfg: SweepConfig) -> tuple[dict[str, list], dict[str, Any]]:
    """The sweep's grid and the distributions of every swept setting, refusing a search that
    cannot run: no validation cache to rank by, a grid mixed with sampling, nothing to sweep,
    sampling without --trials, a setting both fixed and swept."""
    if cfg.train.val_cache is None:
        raise ConfigError("a sweep ranks trials by validation mIoU: give --val-cache")
    grid = parse_grid(cfg.grid)
    sampled = bool(cfg.ranges or cfg.choices)
    if grid and sampled:
        raise ConfigError("use --grid, or --range/--choice with --trials, not both")
    if not grid and not sampled:
        raise ConfigError("nothing to sweep: give --grid NAME=V1,V2 or --range/--choice")
    if sampled and not cfg.trials:
        raise ConfigError("a sampled search needs --trials N")
    distributions = param_distributions(cfg)
    fixed = {k for k in SWEEPABLE if getattr(cfg.train, k) != default(TrainConfig, k)}
    overlap = set(distributions) & fixed
    if overlap:
        raise ConfigError(f"{', '.join(sorted(overlap))}: both fixed and swept")
    return grid, distributions
