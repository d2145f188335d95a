"""`offroad-seg sweep`: many head trainings on features loaded once, searched with Optuna.

A sweep is an Optuna study stored next to its results (`OUT/study.db`, SQLite; or any
database URL several machines reach, `--storage`). Grids are enqueued as fixed trials when the
study is created; sampled searches ask Optuna's TPE sampler for each trial. Every process of
the sweep loads the caches once and trains its trials on them; each trial is a normal run
folder under `OUT/trials/` named after its settings.

Processes share the study: a trial is popped from the storage atomically, and on one machine
a file lock also serialises the "is anything left?" check, so no trial runs twice. A process
killed mid-trial leaves its trial RUNNING: the next process on that machine finds its pid gone,
marks it failed and enqueues the same settings again, so the interrupted trial starts over
(trainings are deterministic, so the leaderboard ends as if nothing had happened).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from offroad_seg.config import RUN_SETTINGS, SweepConfig, TrainConfig, default
from offroad_seg.core import distributed
from offroad_seg.core.atomic import pid_alive, write_json_atomic, write_text_atomic
from offroad_seg.core.text import plural
from offroad_seg.errors import ConfigError, OffroadSegError

log = logging.getLogger(__name__)

STUDY_NAME = "offroad-seg-sweep"
SWEEP_FILE = "sweep.json"
TRIALS_DIR = "trials"
LOCK_FILE = ".sweep.lock"
SWEEP_OUTPUTS = (SWEEP_FILE, "study.db", TRIALS_DIR, "leaderboard.csv", "leaderboard.md",
                 "leaderboard.png", "best", LOCK_FILE)  # fmt: skip
SWEEPABLE = tuple(name for name in RUN_SETTINGS if name != "preset")


# ----------------------------------------------------------------------------- search space


def parse_value(name: str, text: str) -> Any:
    """A setting's value from text, in the type of its TrainConfig field."""
    if name not in SWEEPABLE:
        raise ConfigError(f"{name!r} cannot be swept; settings: {', '.join(SWEEPABLE)}")
    text = text.strip()
    try:
        if name == "dropout":
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


def trial_slug(params: dict[str, Any]) -> str:
    """A run folder name that says what the trial is, the same for the same settings."""
    text = ",".join(f"{k}={_fmt(v)}" for k, v in sorted(params.items()))
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:6]
    safe = re.sub(r"[^A-Za-z0-9=.,+-]+", "_", text)[:80]
    return f"{safe}-{digest}" if safe else digest


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- the study


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """A file lock for the study's bookkeeping among this machine's processes."""
    with open(out / LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _identity(cfg: SweepConfig) -> dict[str, Any]:
    base = {k: getattr(cfg.train, k) for k in SWEEPABLE}
    return {
        "caches": [str(p) for p in cfg.train.caches],
        "val_cache": str(cfg.train.val_cache),
        "settings": base,
        "grid": {k: list(v) for k, v in parse_grid(cfg.grid).items()},
        "ranges": [[r.name, r.low, r.high, r.scale] for r in map(parse_range, cfg.ranges)],
        "choices": {k: list(v) for k, v in parse_grid(cfg.choices).items()},
        "trials": cfg.trials,
        "prune": cfg.prune,
        "sampler_seed": cfg.sampler_seed,
    }


def _prepare(cfg: SweepConfig, identity: dict[str, Any]) -> None:
    out = cfg.out
    path = out / SWEEP_FILE
    if cfg.overwrite:
        for name in SWEEP_OUTPUTS:
            p = out / name
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != identity:
            keys = [k for k in identity if previous.get(k) != identity[k]]
            raise OffroadSegError(
                f"{out}: holds another sweep (its {', '.join(keys)} differ); rerun it with its "
                "own settings to resume, use another folder, or --overwrite"
            )
        return
    if out.exists() and any(out.iterdir()) and not (out / LOCK_FILE).exists():
        raise OffroadSegError(f"{out}: not empty and not a sweep folder; use another folder")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, identity)


def _storage(cfg: SweepConfig):
    import optuna

    url = cfg.storage or f"sqlite:///{(cfg.out / 'study.db').resolve()}"
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=engine)


def _recover_interrupted(study) -> int:
    """Trials left RUNNING by processes of this machine that died: failed, and their settings
    enqueued again, so they start over."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    recovered = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get("host") != host or pid_alive(int(attrs.get("pid", -1))):
            continue
        study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"queued": True, "retry_of": trial.number})
        recovered += 1
    return recovered


def _distributions(cfg: SweepConfig) -> dict[str, Any]:
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


def _grid_points(cfg: SweepConfig) -> list[dict[str, Any]]:
    grid = parse_grid(cfg.grid)
    points: list[dict[str, Any]] = [{}]
    for name, values in grid.items():
        points = [{**p, name: v} for p in points for v in values]
    return points


@dataclass
class SweepResult:
    out: Path
    rows: list[dict]  # the leaderboard, best first
    trained: int  # trials this process ran
    seconds: float
    best: Path | None = None
    pruned: int = 0
    failed: list[str] = field(default_factory=list)


def sweep(cfg: SweepConfig) -> SweepResult:
    """Run (or resume, or join) the sweep; see the module docstring."""
    import optuna

    started = time.perf_counter()
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
    distributions = _distributions(cfg)
    fixed = {k for k in SWEEPABLE if getattr(cfg.train, k) != default(TrainConfig, k)}
    overlap = set(distributions) & fixed
    if overlap:
        raise ConfigError(f"{', '.join(sorted(overlap))}: both fixed and swept")
    identity = _identity(cfg)
    world = distributed.from_env()  # under torchrun each rank is a sweep process of its own
    with contextlib.suppress(FileExistsError):
        cfg.out.mkdir(parents=True, exist_ok=True)
    with _locked(cfg.out):
        _prepare(cfg, identity)
        logging.getLogger("optuna").setLevel(logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=cfg.sampler_seed + world.rank)
        pruner = (
            optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
            if cfg.prune
            else optuna.pruners.NopPruner()
        )
        study = optuna.create_study(
            study_name=STUDY_NAME,
            storage=_storage(cfg),
            direction="maximize",
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
        recovered = _recover_interrupted(study)
        if recovered:
            log.info("%s interrupted: starting again", plural(recovered, "trial"))
        if grid and not study.get_trials(deepcopy=False):
            for point in _grid_points(cfg):
                study.enqueue_trial(point, user_attrs={"queued": True})
    total = len(_grid_points(cfg)) if grid else cfg.trials

    from offroad_seg.core.runtime import resolve_device
    from offroad_seg.training.loop import load_training_data

    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and world.enabled:
        device = world.device(device)
    data = None
    result = SweepResult(cfg.out, [], 0, 0.0)
    bar = tqdm(
        total=total, unit="trial", desc="sweep", disable=None if cfg.train.progress else True
    )
    try:
        while True:
            trial = _next_trial(study, cfg, grid=bool(grid), total=total)
            bar.n = _finished(study)
            bar.refresh()
            if trial is None:
                break
            if data is None:  # the features, once per process
                data = load_training_data(replace(cfg.train, device=str(device)), device)
            _run_trial(study, trial, cfg, distributions, data, result)
            result.trained += 1
            with _locked(cfg.out):
                rows = write_leaderboard(cfg.out, study)
            if rows:
                bar.set_postfix_str(f"best {rows[0]['val_miou']:.4f}")
    finally:
        bar.n = _finished(study)
        bar.close()
    with _locked(cfg.out):
        result.rows = write_leaderboard(cfg.out, study)
    best_link = cfg.out / "best"
    result.best = best_link.resolve() if best_link.exists() else None
    result.seconds = time.perf_counter() - started
    return result


def _finished(study) -> int:
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=done))


def _next_trial(study, cfg: SweepConfig, grid: bool, total: int):
    """The next trial for this process, or None when the sweep is done. The check and the ask
    happen under the machine's lock, so two processes never take the same last trial."""
    from optuna.trial import TrialState

    with _locked(cfg.out):
        trials = study.get_trials(deepcopy=False)
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        if grid and not waiting:
            return None
        if not grid and not waiting:
            taken = [
                t
                for t in trials
                if not (t.state == TrialState.FAIL and t.user_attrs.get("interrupted"))
            ]
            if len(taken) >= total:
                return None
        trial = study.ask()
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
    if grid and not trial.user_attrs.get("queued"):
        # another machine took the last queued trial between our check and our ask
        trial.set_user_attr("spare", True)
        study.tell(trial, state=TrialState.FAIL)
        return None
    return trial


def _suggest(trial, name: str, dist) -> Any:
    """The trial's value of a setting (a queued trial's fixed value, or a sample)."""
    import optuna.distributions as d

    if isinstance(dist, d.CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, d.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high)
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log)


def _run_trial(study, trial, cfg: SweepConfig, distributions, data, result: SweepResult) -> None:
    import optuna
    from optuna.trial import TrialState

    from offroad_seg.training.loop import train

    params = {name: _suggest(trial, name, dist) for name, dist in distributions.items()}
    slug = trial_slug(params)
    trial.set_user_attr("run", slug)
    run_cfg = replace(
        cfg.train,
        **params,
        out=cfg.out / TRIALS_DIR / slug,
        resume=False,
        overwrite=True,  # an interrupted attempt of the same settings starts over
        progress=False,
    )

    def report(row: dict) -> None:
        trial.report(row["val_miou"], row["epoch"])
        if trial.should_prune():
            raise optuna.TrialPruned

    log.info("trial %d: %s", trial.number, slug)
    epochs_log = logging.getLogger("offroad_seg.training.loop")
    level = epochs_log.level
    epochs_log.setLevel(max(level, logging.WARNING))  # one line per trial, not per epoch
    try:
        outcome = train(run_cfg, data=data, on_epoch=report, world=distributed.SINGLE)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        result.pruned += 1
        return
    except OffroadSegError as e:  # settings that cannot be trained (e.g. a width for linear)
        trial.set_user_attr("error", str(e))
        study.tell(trial, state=TrialState.FAIL)
        result.failed.append(f"{slug}: {e}")
        log.warning("trial %d failed: %s", trial.number, e)
        return
    finally:
        epochs_log.setLevel(level)
    study.tell(trial, outcome.best["val_miou"])
    log.info("trial %d: val mIoU %.4f", trial.number, outcome.best["val_miou"])


# ----------------------------------------------------------------------------- leaderboard


def _trial_row(out: Path, trial) -> dict | None:
    from offroad_seg.models.checkpoint import load_checkpoint

    run = out / TRIALS_DIR / trial.user_attrs.get("run", "")
    head = run / "segmentation_head.pth"
    if not head.is_file():
        return None
    payload = load_checkpoint(head).payload
    history = json.loads((run / "train_stats" / "history.json").read_text())["history"]
    best = payload["best"]
    val = payload.get("val_metrics", {})
    row = {
        "run": trial.user_attrs["run"],
        "state": trial.state.name.lower(),
        **{k: _fmt(v) for k, v in sorted(trial.params.items())},
        "val_miou": best["val_miou"],
        "val_dice": best["val_dice"],
        "val_pixel_acc": best["val_pixel_acc"],
        "best_epoch": best["epoch"],
        "epochs": len(history),
        "s_per_epoch": sum(h["seconds"] for h in history) / len(history),
    }
    for name, per_class in val.get("per_class", {}).items():
        row[f"iou {name}"] = per_class["iou"]
    return row


def leaderboard_rows(out: Path, study) -> list[dict]:
    """One row per finished trial (completed, then pruned), best validation mIoU first."""
    from optuna.trial import TrialState

    rows = []
    for trial in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)):
        row = _trial_row(out, trial)
        if row is not None:
            rows.append(row)
    return sorted(rows, key=lambda r: (r["state"] != "complete", -r["val_miou"], r["run"]))


def write_leaderboard(out: Path, study) -> list[dict]:
    """leaderboard.csv, .md and .png, and the `best` link to the best run's folder."""
    rows = leaderboard_rows(out, study)
    if not rows:
        return rows
    from offroad_seg.training.loop import history_csv

    keys = list(dict.fromkeys(k for row in rows for k in row))
    write_text_atomic(out / "leaderboard.csv", history_csv(rows))
    write_text_atomic(out / "leaderboard.md", _markdown(rows, keys))
    _plot(out, rows)
    best = out / "best"
    target = Path(TRIALS_DIR) / rows[0]["run"]
    current = os.readlink(best) if best.is_symlink() else None
    if rows[0]["state"] == "complete" and current != str(target):
        tmp = out / f".best.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, best)
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _markdown(rows: list[dict], keys: list[str]) -> str:
    lines = ["| rank | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for i, row in enumerate(rows, 1):
        lines.append(f"| {i} | " + " | ".join(_cell(row.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _plot(out: Path, rows: list[dict]) -> None:
    from offroad_seg.reporting.plots import plot_sweep

    curves = {}
    for row in [r for r in rows if r["state"] == "complete"][:5]:
        history = json.loads(
            (out / TRIALS_DIR / row["run"] / "train_stats" / "history.json").read_text()
        )["history"]
        curves[row["run"]] = [(h["epoch"], h.get("val_miou")) for h in history]
    plot_sweep(rows, curves, out / "leaderboard.png", title=out.name)
