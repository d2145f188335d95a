"""The sweep's Optuna study and its storage (OUT/study.db, or a --storage URL): opening it with
its integrity checked, reading it through once, its database errors as one line naming it,
the trial folders it records, and the trials that processes killed mid-trial left RUNNING."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

from offroad_seg.config import SweepConfig
from offroad_seg.core.atomic import pid_alive
from offroad_seg.errors import OffroadSegError
from offroad_seg.training.sweep.space import SAMPLE

log = logging.getLogger(__name__)

STUDY_NAME = "offroad-seg-sweep"
STUDY_DB = "study.db"


def sqlite_default(cfg: SweepConfig) -> bool:
    return cfg.storage is None


def _storage_url(cfg: SweepConfig) -> str:
    if cfg.storage is None:
        return f"sqlite:///{(cfg.out / STUDY_DB).resolve()}"
    return _with_installed_driver(cfg.storage)


def _with_installed_driver(url: str) -> str:
    """`postgresql://` names no driver: SQLAlchemy 2.0 then loads psycopg2, 2.1 psycopg 3.
    The `postgres` extra installs psycopg 3, so a URL without a driver uses it when psycopg2
    is not there (any SQLAlchemy 2.x), rather than fail on a module the user never chose."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres") or not sep:
        return url
    if importlib.util.find_spec("psycopg2") or not importlib.util.find_spec("psycopg"):
        return url
    return f"postgresql+psycopg://{rest}"


def study_location(cfg: SweepConfig) -> str:
    """The study's place, for messages: the file, or the URL without its password."""
    if sqlite_default(cfg):
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
    if sqlite_default(cfg):
        return OffroadSegError(
            f"{study_location(cfg)}: not a readable sweep database ({_cause(e)}); rerun with "
            "--overwrite to start the sweep over, or use another folder"
        )
    if isinstance(e, ImportError):  # the URL's database driver is not installed
        return OffroadSegError(
            f"{study_location(cfg)}: cannot open the study ({_cause(e)}); install the "
            "database's driver (PostgreSQL: pip install 'offroad-seg[postgres]')"
        )
    return OffroadSegError(
        f"{study_location(cfg)}: cannot open the study ({_cause(e)}); check the URL and that the "
        "database is reachable"
    )


def _check_sqlite(path: Path) -> None:
    """Raise sqlite3.Error for a damaged database file (sqlite's own check, read-only)."""
    import sqlite3

    if not path.is_file() or path.stat().st_size == 0:
        return
    _roll_back_hot_journal(path)
    con = _read_only(path)
    try:
        problems = con.execute("PRAGMA integrity_check").fetchall()
    finally:
        con.close()
    if problems != [("ok",)]:
        raise sqlite3.DatabaseError(str(problems[0][0]))


def open_storage(cfg: SweepConfig):
    """The study's storage, checked: a damaged file or a bad URL is one line naming it.
    Running trials record heartbeats in it (see `trial_heartbeat`)."""
    import optuna

    url = _storage_url(cfg)
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    try:
        if sqlite_default(cfg):
            _check_sqlite(cfg.out / STUDY_DB)
        with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=cfg.heartbeat_s,
                grace_period=cfg.stale_after_s,
            )
    except _storage_errors() as e:
        raise _study_fault(cfg, e) from None


def _roll_back_hot_journal(path: Path) -> None:
    """A process killed inside a write leaves study.db-journal beside the database: sqlite
    rolls it back at the next read, which a read-only connection may not do ("attempt to
    write a readonly database"). A read-write connection's first read does it, restoring the
    database as it was before that write (what any sqlite client does on opening it)."""
    import sqlite3

    journal = path.with_name(path.name + "-journal")
    if not journal.is_file() or journal.stat().st_size == 0:
        return
    con = sqlite3.connect(path, timeout=120)
    try:
        con.execute("SELECT count(*) FROM sqlite_master").fetchall()
    finally:
        con.close()


def _read_only(path: Path):
    import sqlite3

    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def recorded_runs(cfg: SweepConfig) -> list[str] | None:
    """The trial folders the sweep's study records, [] when there is no study, None when it
    cannot be read. Reads the default study.db read-only (it may not be ours yet)."""
    import sqlite3

    if not sqlite_default(cfg):
        import optuna

        try:
            storage = open_storage(cfg)
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


def delete_study(cfg: SweepConfig) -> None:
    if sqlite_default(cfg):
        for suffix in ("", "-journal", "-wal", "-shm"):
            (cfg.out / f"{STUDY_DB}{suffix}").unlink(missing_ok=True)
        return
    import optuna

    storage = open_storage(cfg)
    if STUDY_NAME in optuna.get_all_study_names(storage=storage):
        optuna.delete_study(study_name=STUDY_NAME, storage=storage)


def load_study(cfg: SweepConfig, storage, sampler, pruner):
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


@contextlib.contextmanager
def reading_study(cfg: SweepConfig) -> Iterator[None]:
    """Database errors while the sweep runs, as one line naming the study (training's own
    errors pass: they are not the database's)."""
    try:
        yield
    except _database_errors() as e:
        raise _study_fault(cfg, e) from None


def _dead_trials(study) -> list:
    """RUNNING trials whose process is gone: on this machine, a pid no longer alive; on any
    machine, a heartbeat older than the storage's grace period (Optuna's stale-trial rule)."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    stale = set(study._storage._get_stale_trial_ids(study._study_id))
    dead = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        ours_and_gone = attrs.get("host") == host and not pid_alive(int(attrs.get("pid", -1)))
        if ours_and_gone or trial._trial_id in stale:
            dead.append(trial)
    return dead


def recover_interrupted(study) -> int:
    """Trials left RUNNING by processes that died (`_dead_trials`): failed, and their settings
    enqueued again (with their sample index), so they start over. Processes on several
    machines may find the same dead trial at once: the database fails it for one of them
    only (a row lock), and only that one enqueues the retry."""
    import optuna
    from optuna.trial import TrialState

    recovered = 0
    for trial in _dead_trials(study):
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process recovered it first (or it finished after all)
        retry = {"queued": True, "retry_of": trial.number}
        if SAMPLE in trial.user_attrs:
            retry[SAMPLE] = trial.user_attrs[SAMPLE]
        study.enqueue_trial(trial.params, user_attrs=retry)
        recovered += 1
    return recovered


def ask_with_heartbeat(study):
    """`study.ask()`, the trial's first heartbeat recorded at once: a trial whose process dies
    right after taking it is still seen as dead from other machines."""
    with warnings.catch_warnings():  # Optuna expects heartbeats only from study.optimize
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        trial = study.ask()
    study._storage.record_heartbeat(trial._trial_id)
    return trial


@contextlib.contextmanager
def trial_heartbeat(study, trial) -> Iterator[None]:
    """Record the trial's heartbeat every `heartbeat_interval` seconds while it runs, so that
    processes on other machines can tell it from one whose machine died. A failed beat (the
    database briefly unreachable) is logged; training goes on."""
    storage = study._storage
    # only database storages beat (a test's in-memory study has nobody else to tell)
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                storage.record_heartbeat(trial._trial_id)
            except _database_errors() as e:
                log.warning("trial %d: heartbeat not recorded (%s)", trial.number, _cause(e))

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def failed_for_good(trial) -> bool:
    """A trial that failed on its own (settings that cannot be trained, a diverged loss), not
    one interrupted (it is restarted) or a spare ask (never run)."""
    return not (trial.user_attrs.get("interrupted") or trial.user_attrs.get("spare"))
