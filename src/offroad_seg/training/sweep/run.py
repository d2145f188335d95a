"""`offroad-seg sweep`; see the package docstring."""

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
from offroad_seg.core.atomic import (
    pid_alive,
    remove_stale_temps,
    temp_path,
    write_json_atomic,
    write_text_atomic,
)
from offroad_seg.core.text import plural
from offroad_seg.errors import ConfigError, OffroadSegError, TrainingDiverged

log = logging.getLogger(__name__)

STUDY_NAME = "offroad-seg-sweep"
SWEEP_FILE = "sweep.json"
TRIALS_DIR = "trials"
LOCK_FILE = ".sweep.lock"
STUDY_DB = "study.db"
MARKER = "offroad-seg sweep"  # sweep.json's "kind": what makes a folder a sweep's
LEADERBOARDS = ("leaderboard.csv", "leaderboard.md", "leaderboard.png")
BEST_LINK = "best"
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


def trial_slug(params: dict[str, Any], index: int | None = None) -> str:
    """A run folder name that says what the trial is, the same for the same settings; a
    sampled trial's starts with its sample index, so two samples never share a folder."""
    text = ",".join(f"{k}={_fmt(v)}" for k, v in sorted(params.items()))
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:6]
    safe = re.sub(r"[^A-Za-z0-9=.,+-]+", "_", text)[:80]
    slug = f"{safe}-{digest}" if safe else digest
    return slug if index is None else f"{index:03d}-{slug}"


# How trial_slug names a folder: what --overwrite may remove when the study cannot say.
_SLUG = re.compile(r"^[A-Za-z0-9=.,+_-]*[0-9a-f]{6}$")


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- the folder


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


class _Unreadable:
    """sweep.json exists but cannot be read: `cause` says why."""

    def __init__(self, cause: str) -> None:
        self.cause = cause


def _is_sweep_record(record: Any) -> bool:
    """sweep.json's content: ours by its marker (or, written before the marker existed, by
    its fields)."""
    if not isinstance(record, dict):
        return False
    return record.get("kind") == MARKER or {"caches", "val_cache", "settings"} <= set(record)


def _only_our_start(out: Path, names: list[str]) -> bool:
    """A folder holding nothing but what a sweep writes before sweep.json: the lock and
    sweep.json's temporary file (a sweep killed as it started)."""
    first = re.compile(rf"^\.{re.escape(SWEEP_FILE)}\..+\.tmp$")
    return all(name == LOCK_FILE or first.match(name) for name in names)


def _inspect(out: Path) -> dict | _Unreadable | None:
    """What `out` holds, touching nothing: None for a new sweep (missing, empty, or only a
    start that was killed), the earlier sweep's record, or _Unreadable. Any other folder is
    refused: it is not a sweep of ours, and --overwrite does not change that."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise OffroadSegError(f"{out}: not a folder; give a folder for the sweep")
    names = [p.name for p in out.iterdir()]
    if SWEEP_FILE not in names:
        if _only_our_start(out, names):
            return None
        raise OffroadSegError(
            f"{out}: not empty and not a sweep folder (no {SWEEP_FILE}); use another folder "
            "(--overwrite only starts over a sweep)"
        )
    path = out / SWEEP_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return _Unreadable(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if not _is_sweep_record(record):
        raise OffroadSegError(
            f"{path}: not an offroad-seg sweep record; {out} is not a sweep folder, use another "
            "folder"
        )
    return {k: v for k, v in record.items() if k != "kind"}


def _check_folder(cfg: SweepConfig) -> dict | _Unreadable | None:
    """`_inspect`, refusing an unreadable sweep.json unless --overwrite."""
    previous = _inspect(cfg.out)
    if isinstance(previous, _Unreadable) and not cfg.overwrite:
        raise OffroadSegError(
            f"{cfg.out / SWEEP_FILE}: unreadable ({previous.cause}); rerun with --overwrite to "
            "start the sweep over, or use another folder"
        )
    if isinstance(previous, _Unreadable) and not _recorded_runs(cfg):
        # only a study that records trials shows that the folder is a sweep's
        raise OffroadSegError(
            f"{cfg.out / SWEEP_FILE}: unreadable ({previous.cause}) and no study records "
            f"trials there: nothing shows that {cfg.out} is a sweep; move what you want to "
            "keep and delete the folder yourself, or use another folder"
        )
    return previous


def _write_record(out: Path, identity: dict[str, Any]) -> None:
    write_json_atomic(out / SWEEP_FILE, {"kind": MARKER, **identity})


def _check_same_sweep(out: Path, previous: dict, identity: dict[str, Any]) -> None:
    if previous != identity:
        keys = [k for k in identity if previous.get(k) != identity[k]]
        raise OffroadSegError(
            f"{out}: holds another sweep (its {', '.join(keys) or 'record'} differ); rerun it "
            "with its own settings to resume, use another folder, or --overwrite"
        )


def _trial_like_folders(out: Path) -> list[Path]:
    """The folders under trials/ named and laid out as a sweep's trials (what --overwrite
    removes when the study that records them cannot be read)."""
    trials = out / TRIALS_DIR
    if not trials.is_dir() or trials.is_symlink():
        return []
    from offroad_seg.training.loop import HEAD_FILE, LAST_FILE, STATS_DIR

    found = []
    for run in sorted(trials.iterdir()):
        if run.is_symlink() or not run.is_dir() or not _SLUG.match(run.name):
            continue
        contents = {p.name for p in run.iterdir()}
        if not contents or contents & {HEAD_FILE, LAST_FILE, STATS_DIR}:
            found.append(run)
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _start_over(cfg: SweepConfig) -> None:
    """--overwrite: remove what the sweep wrote, in an order that a kill can interrupt (the
    study, which says which trial folders are the sweep's, goes after them; sweep.json, which
    says the folder is a sweep's, is replaced, never removed). User files stay."""
    out = cfg.out
    runs = _recorded_runs(cfg)
    if runs:
        folders = [out / TRIALS_DIR / run for run in runs if _SLUG.match(run)]  # no ".."
    else:  # the study cannot say (damaged, emptied): only folders named and laid out as trials
        folders = _trial_like_folders(out)
    for folder in folders:
        if folder.exists() or folder.is_symlink():
            _remove(folder)
    with contextlib.suppress(OSError):
        (out / TRIALS_DIR).rmdir()  # only when empty: a user's file in it stays
    _delete_study(cfg)
    for name in LEADERBOARDS:
        (out / name).unlink(missing_ok=True)
    if (out / BEST_LINK).is_symlink():
        (out / BEST_LINK).unlink()
    log.info("%s: started over (%s removed)", out, plural(len(folders), "trial folder"))


# ----------------------------------------------------------------------------- the study


def _sqlite_default(cfg: SweepConfig) -> bool:
    return cfg.storage is None


def _storage_url(cfg: SweepConfig) -> str:
    return cfg.storage or f"sqlite:///{(cfg.out / STUDY_DB).resolve()}"


def _where(cfg: SweepConfig) -> str:
    """The study's place, for messages: the file, or the URL without its password."""
    if _sqlite_default(cfg):
        return str(cfg.out / STUDY_DB)
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    try:
        return f"--storage {make_url(cfg.storage).render_as_string(hide_password=True)}"
    except (sqlalchemy.exc.ArgumentError, ValueError):  # not even a URL: as given
        return f"--storage {cfg.storage}"


def _cause(e: BaseException) -> str:
    """The first line of a database error, without sqlalchemy's SQL and links."""
    inner = getattr(e, "orig", None) or e
    text = str(inner).splitlines()[0] if str(inner) else type(inner).__name__
    if isinstance(e, ImportError) and e.__cause__ is not None:
        text += f" ({e.__cause__})"
    return text


def _database_errors() -> tuple[type[BaseException], ...]:
    """What only a database raises: a broken or unreachable one, while the sweep runs."""
    import sqlite3

    import optuna
    import sqlalchemy.exc

    return (sqlite3.Error, sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError)


def _storage_errors() -> tuple[type[BaseException], ...]:
    """What a broken, unreachable or unknown database raises while it is opened and read
    through (nothing else runs then, so a ValueError is the database's)."""
    return (
        *_database_errors(),
        ImportError,  # a URL whose driver is not installed
        ValueError,  # undecodable text or JSON in a damaged database
        KeyError,
    )


def _study_fault(cfg: SweepConfig, e: BaseException) -> OffroadSegError:
    if _sqlite_default(cfg):
        return OffroadSegError(
            f"{_where(cfg)}: not a readable sweep database ({_cause(e)}); rerun with "
            "--overwrite to start the sweep over, or use another folder"
        )
    return OffroadSegError(
        f"{_where(cfg)}: cannot open the study ({_cause(e)}); check the URL and that the "
        "database is reachable"
    )


def _check_sqlite(path: Path) -> None:
    """Raise sqlite3.Error for a damaged database file (sqlite's own check, read-only)."""
    import sqlite3

    if not path.is_file() or path.stat().st_size == 0:
        return
    con = _read_only(path)
    try:
        problems = con.execute("PRAGMA integrity_check").fetchall()
    finally:
        con.close()
    if problems != [("ok",)]:
        raise sqlite3.DatabaseError(str(problems[0][0]))


def _open_storage(cfg: SweepConfig):
    """The study's storage, checked: a damaged file or a bad URL is one line naming it."""
    import optuna

    url = _storage_url(cfg)
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    try:
        if _sqlite_default(cfg):
            _check_sqlite(cfg.out / STUDY_DB)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except _storage_errors() as e:
        raise _study_fault(cfg, e) from None


def _read_only(path: Path):
    import sqlite3

    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def _recorded_runs(cfg: SweepConfig) -> list[str] | None:
    """The trial folders the sweep's study records, [] when there is no study, None when it
    cannot be read. Reads the default study.db read-only (it may not be ours yet)."""
    import sqlite3

    if not _sqlite_default(cfg):
        import optuna

        try:
            storage = _open_storage(cfg)
            if STUDY_NAME not in optuna.get_all_study_names(storage=storage):
                return []
            trials = optuna.load_study(study_name=STUDY_NAME, storage=storage).get_trials()
        except _storage_errors():
            return None
        return sorted({t.user_attrs.get("run", "") for t in trials} - {""})
    path = cfg.out / STUDY_DB
    if not path.is_file() or path.stat().st_size == 0:
        return []
    try:
        _check_sqlite(path)
        con = _read_only(path)
        try:
            rows = con.execute(
                "SELECT a.value_json FROM trial_user_attributes a JOIN trials t "
                "ON a.trial_id = t.trial_id JOIN studies s ON t.study_id = s.study_id "
                "WHERE s.study_name = ? AND a.key = 'run'",
                (STUDY_NAME,),
            ).fetchall()
        finally:
            con.close()
        runs = {json.loads(value) for (value,) in rows}
    except (sqlite3.Error, ValueError):
        return None
    return sorted(run for run in runs if isinstance(run, str))


def _delete_study(cfg: SweepConfig) -> None:
    if _sqlite_default(cfg):
        for suffix in ("", "-journal", "-wal", "-shm"):
            (cfg.out / f"{STUDY_DB}{suffix}").unlink(missing_ok=True)
        return
    import optuna

    storage = _open_storage(cfg)
    if STUDY_NAME in optuna.get_all_study_names(storage=storage):
        optuna.delete_study(study_name=STUDY_NAME, storage=storage)


def _load_study(cfg: SweepConfig, storage, sampler, pruner):
    """Create or load the study and read it through once: a damaged record is one line now,
    not a traceback in the middle of the sweep."""
    import optuna

    try:
        study = optuna.create_study(
            study_name=STUDY_NAME,
            storage=storage,
            direction="maximize",
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
        for trial in study.get_trials(deepcopy=False):
            _ = (trial.params, trial.user_attrs, trial.state, trial.value)
    except _storage_errors() as e:
        raise _study_fault(cfg, e) from None
    return study


def _check_record_kept(cfg: SweepConfig, has_trials: bool) -> None:
    """A study without trials beside trial folders lost its record (emptied or replaced):
    running on would train every trial again beside the old ones."""
    folders = [] if has_trials else _trial_like_folders(cfg.out)
    if folders:
        raise OffroadSegError(
            f"{_where(cfg)}: holds no trials, but {cfg.out / TRIALS_DIR} holds "
            f"{plural(len(folders), 'trial folder')}: the sweep's record is lost; rerun with "
            "--overwrite to start the sweep over, or use another folder"
        )


@contextlib.contextmanager
def _reading_study(cfg: SweepConfig) -> Iterator[None]:
    """Database errors while the sweep runs, as one line naming the study (training's own
    errors pass: they are not the database's)."""
    try:
        yield
    except _database_errors() as e:
        raise _study_fault(cfg, e) from None


def _recover_interrupted(study) -> int:
    """Trials left RUNNING by processes of this machine that died: failed, and their settings
    enqueued again (with their sample index), so they start over."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    recovered = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get("host") != host or pid_alive(int(attrs.get("pid", -1))):
            continue
        study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        retry = {"queued": True, "retry_of": trial.number}
        if SAMPLE in attrs:
            retry[SAMPLE] = attrs[SAMPLE]
        study.enqueue_trial(trial.params, user_attrs=retry)
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


# ----------------------------------------------------------------------------- sampling

SAMPLE = "sample"  # a sampled trial's user attr: its sample index, 0, 1, ...


def _sample_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"offroad-seg sweep {seed} {index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _sampler(seed: int):
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


def _sample_index(study, trial) -> int:
    """A fresh sampled trial's index: the fresh trials numbered before it (a restarted
    trial, enqueued, carries its original's). Trial numbers come from the storage, so
    processes on several machines never get the same index."""
    return sum(
        1
        for t in study.get_trials(deepcopy=False)
        if t.number < trial.number and not t.user_attrs.get("queued")
    )


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
    _check_folder(cfg)  # before anything is written: another folder is refused untouched
    if not _sqlite_default(cfg):
        _open_storage(cfg)  # a bad URL: one line, and nothing written
    with contextlib.suppress(FileExistsError):
        cfg.out.mkdir(parents=True, exist_ok=True)
    with _locked(cfg.out):
        previous = _check_folder(cfg)  # again: another process may have started meanwhile
        removed = remove_stale_temps(cfg.out)
        if removed:
            log.info("removed %s left by killed writers", plural(len(removed), "temporary file"))
        if cfg.overwrite and previous is not None:
            _start_over(cfg)
            previous = None
        if previous is None:
            _write_record(cfg.out, identity)  # first: it marks the folder as a sweep's
        else:
            _check_same_sweep(cfg.out, previous, identity)
        logging.getLogger("optuna").setLevel(logging.WARNING)
        pruner = (
            optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
            if cfg.prune
            else optuna.pruners.NopPruner()
        )
        if _sqlite_default(cfg):  # an emptied or missing study.db: refused before it is made
            db = cfg.out / STUDY_DB
            _check_record_kept(cfg, db.is_file() and db.stat().st_size > 0)
        study = _load_study(cfg, _open_storage(cfg), _sampler(cfg.sampler_seed), pruner)
        _check_record_kept(cfg, bool(study.get_trials(deepcopy=False)))
        with _reading_study(cfg):
            recovered = _recover_interrupted(study)
            if recovered:
                log.info("%s interrupted: starting again", plural(recovered, "trial"))
            if grid and not study.get_trials(deepcopy=False):
                for point in _grid_points(cfg):
                    study.enqueue_trial(point, user_attrs={"queued": True})
    total = len(_grid_points(cfg)) if grid else cfg.trials
    with _reading_study(cfg):
        return _run_trials(cfg, study, world, distributions, grid=bool(grid), total=total,
                           started=started)  # fmt: skip


def _run_trials(cfg, study, world, distributions, grid: bool, total: int, started: float):
    """This process's share of the trials, then the leaderboard."""
    from offroad_seg.core.runtime import resolve_device
    from offroad_seg.training.inputs import load_training_data

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
            trial = _next_trial(study, cfg, grid=grid, total=total)
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
            best = _best_row(rows)
            if best is not None:
                bar.set_postfix_str(f"best {best['val_miou']:.4f}")
    finally:
        bar.n = _finished(study)
        bar.close()
    with _locked(cfg.out):
        result.rows = write_leaderboard(cfg.out, study)
    best_link = cfg.out / BEST_LINK
    result.best = best_link.resolve() if best_link.exists() else None
    result.seconds = time.perf_counter() - started
    return result


def _best_row(rows: list[dict]) -> dict | None:
    """The leaderboard's best completed trial (failed and pruned ones never are)."""
    return rows[0] if rows and rows[0]["state"] == "complete" else None


def _finished(study) -> int:
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED)
    failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
              if _failed_for_good(t)]  # fmt: skip
    return len(study.get_trials(deepcopy=False, states=done)) + len(failed)


def _failed_for_good(trial) -> bool:
    """A trial that failed on its own (settings that cannot be trained, a diverged loss), not
    one interrupted (it is restarted) or a spare ask (never run)."""
    return not (trial.user_attrs.get("interrupted") or trial.user_attrs.get("spare"))


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
            taken = [t for t in trials if t.state != TrialState.FAIL or _failed_for_good(t)]
            if len(taken) >= total:
                return None
        trial = study.ask()
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        if not grid and SAMPLE not in trial.user_attrs:
            trial.set_user_attr(SAMPLE, _sample_index(study, trial))
    spare = (
        not trial.user_attrs.get("queued")  # another machine took the last queued trial
        if grid
        else trial.user_attrs[SAMPLE] >= total  # other machines asked the last samples
    )
    if spare:
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
    slug = trial_slug(params, trial.user_attrs.get(SAMPLE))
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
    except TrainingDiverged as e:  # NaN/inf loss: final, a rerun does not retry it
        trial.set_user_attr("diverged_epoch", e.epoch)
        _record_failure(study, trial, slug, e, result)
        return
    except OffroadSegError as e:  # settings that cannot be trained (e.g. a width for linear)
        _record_failure(study, trial, slug, e, result)
        return
    finally:
        epochs_log.setLevel(level)
    study.tell(trial, outcome.best["val_miou"])
    log.info("trial %d: val mIoU %.4f", trial.number, outcome.best["val_miou"])


def _record_failure(study, trial, slug: str, e: OffroadSegError, result: SweepResult) -> None:
    from optuna.trial import TrialState

    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    trial.set_user_attr("error", reason)
    study.tell(trial, state=TrialState.FAIL)
    result.failed.append(f"{slug}: {reason}")
    log.warning("trial %d failed: %s", trial.number, reason)


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


def _failed_row(trial) -> dict:
    return {
        "run": trial.user_attrs.get("run", ""),
        "state": "failed",
        **{k: _fmt(v) for k, v in sorted(trial.params.items())},
        "val_miou": None,
        "error": trial.user_attrs.get("error", ""),
    }


_STATE_ORDER = {"complete": 0, "pruned": 1, "failed": 2}


def leaderboard_rows(out: Path, study) -> list[dict]:
    """One row per finished trial: completed ones best validation mIoU first, then pruned,
    then failed (no score; `error` says why)."""
    from optuna.trial import TrialState

    rows = []
    for trial in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)):
        row = _trial_row(out, trial)
        if row is not None:
            rows.append(row)
    for trial in study.get_trials(states=(TrialState.FAIL,)):
        if _failed_for_good(trial) and "run" in trial.user_attrs:
            rows.append(_failed_row(trial))
    return sorted(rows, key=lambda r: (_STATE_ORDER[r["state"]], -(r["val_miou"] or 0.0), r["run"]))


def write_leaderboard(out: Path, study) -> list[dict]:
    """leaderboard.csv, .md and .png, and the `best` link to the best run's folder."""
    rows = leaderboard_rows(out, study)
    if not rows:
        return rows
    from offroad_seg.training.stats import history_csv

    keys = list(dict.fromkeys(k for row in rows for k in row))
    write_text_atomic(out / "leaderboard.csv", history_csv(rows))
    write_text_atomic(out / "leaderboard.md", _markdown(rows, keys))
    _plot(out, [r for r in rows if r["val_miou"] is not None])
    best_row = _best_row(rows)
    if best_row is not None:
        _link_best(out, Path(TRIALS_DIR) / best_row["run"])
    return rows


def _link_best(out: Path, target: Path) -> None:
    best = out / BEST_LINK
    current = os.readlink(best) if best.is_symlink() else None
    if current != str(target):
        tmp = temp_path(best)  # a killed writer's is removed by the next run
        tmp.symlink_to(target)
        os.replace(tmp, best)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")  # an error message must not split the table


def _markdown(rows: list[dict], keys: list[str]) -> str:
    lines = ["| rank | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for i, row in enumerate(rows, 1):
        lines.append(f"| {i} | " + " | ".join(_cell(row.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _plot(out: Path, rows: list[dict]) -> None:
    """leaderboard.png of the scored rows (failed trials have no score to draw)."""
    from offroad_seg.reporting.plots import plot_sweep

    if not rows:
        return

    curves = {}
    for row in [r for r in rows if r["state"] == "complete"][:5]:
        history = json.loads(
            (out / TRIALS_DIR / row["run"] / "train_stats" / "history.json").read_text()
        )["history"]
        curves[row["run"]] = [(h["epoch"], h.get("val_miou")) for h in history]
    plot_sweep(rows, curves, out / "leaderboard.png", title=out.name)
