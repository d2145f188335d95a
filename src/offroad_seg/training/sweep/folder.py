"""A sweep's output folder: what makes it a sweep's (sweep.json and its marker, written first),
the checks before anything in it is touched (another folder is refused, another sweep's
settings too), --overwrite removing only what the sweep wrote, and the lock its processes on
one machine share."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from offroad_seg.config import SweepConfig
from offroad_seg.core.atomic import remove_stale_temps, write_json_atomic
from offroad_seg.core.lock import section_lock
from offroad_seg.core.text import differ, listing, plural
from offroad_seg.errors import OffroadSegError
from offroad_seg.training.sweep.space import SLUG_PATTERN, SWEEPABLE, parse_grid, parse_range
from offroad_seg.training.sweep.study import delete_study, recorded_runs, study_location

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
TRIALS_DIR = "trials"
LOCK_FILE = ".sweep.lock"
MARKER = "offroad-seg sweep"  # sweep.json's "kind": what makes a folder a sweep's
LEADERBOARDS = ("leaderboard.csv", "leaderboard.md", "leaderboard.png")
ENSEMBLE_FILE = "ensemble.pth"  # --ensemble-top K: the best K trials as one model
ENSEMBLE_SUMMARY = "ensemble.json"  # its members and validation mIoU beside the best trial's
BEST_LINK = "best"


def sweep_lock(out: Path) -> contextlib.AbstractContextManager[None]:
    """A file lock for the study's bookkeeping among this machine's processes (its file is
    removed on release: a finished sweep's folder holds none)."""
    return section_lock(out / LOCK_FILE)


def sweep_identity(cfg: SweepConfig) -> dict[str, Any]:
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


def check_folder(cfg: SweepConfig) -> dict | _Unreadable | None:
    """`_inspect`, refusing an unreadable sweep.json unless --overwrite."""
    previous = _inspect(cfg.out)
    if isinstance(previous, _Unreadable) and not cfg.overwrite:
        raise OffroadSegError(
            f"{cfg.out / SWEEP_FILE}: unreadable ({previous.cause}); rerun with --overwrite to "
            "start the sweep over, or use another folder"
        )
    if isinstance(previous, _Unreadable) and not recorded_runs(cfg):
        # only a study that records trials shows that the folder is a sweep's
        raise OffroadSegError(
            f"{cfg.out / SWEEP_FILE}: unreadable ({previous.cause}) and no study records "
            f"trials there: nothing shows that {cfg.out} is a sweep; move what you want to "
            "keep and delete the folder yourself, or use another folder"
        )
    return previous


def write_record(out: Path, identity: dict[str, Any]) -> None:
    write_json_atomic(out / SWEEP_FILE, {"kind": MARKER, **identity})


def check_same_sweep(out: Path, previous: dict, identity: dict[str, Any]) -> None:
    if previous != identity:
        keys = [k for k in identity if previous.get(k) != identity[k]] or ["record"]
        raise OffroadSegError(
            f"{out}: holds another sweep (its {listing(keys)} {differ(len(keys))}); rerun it "
            "with its own settings to resume, use another folder, or --overwrite"
        )


def _trial_like_folders(out: Path) -> list[Path]:
    """The folders under trials/ named and laid out as a sweep's trials (what --overwrite
    removes when the study that records them cannot be read)."""
    trials = out / TRIALS_DIR
    if not trials.is_dir() or trials.is_symlink():
        return []
    from offroad_seg.training.run_folder import HEAD_FILE, LAST_FILE, STATS_DIR

    found = []
    for run in sorted(trials.iterdir()):
        if run.is_symlink() or not run.is_dir() or not SLUG_PATTERN.match(run.name):
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


def start_over(cfg: SweepConfig) -> None:
    """--overwrite: remove what the sweep wrote, in an order that a kill can interrupt (the
    study, which says which trial folders are the sweep's, goes after them; sweep.json, which
    says the folder is a sweep's, is replaced, never removed). User files stay."""
    out = cfg.out
    runs = recorded_runs(cfg)
    if runs:
        folders = [out / TRIALS_DIR / run for run in runs if SLUG_PATTERN.match(run)]  # no ".."
    else:  # the study cannot say (damaged, emptied): only folders named and laid out as trials
        folders = _trial_like_folders(out)
    for folder in folders:
        if folder.exists() or folder.is_symlink():
            _remove(folder)
    with contextlib.suppress(OSError):
        (out / TRIALS_DIR).rmdir()  # only when empty: a user's file in it stays
    delete_study(cfg)
    for name in (*LEADERBOARDS, ENSEMBLE_FILE, ENSEMBLE_SUMMARY):
        (out / name).unlink(missing_ok=True)
    if (out / BEST_LINK).is_symlink():
        (out / BEST_LINK).unlink()
    log.info("%s: started over (%s removed)", out, plural(len(folders), "trial folder"))


def check_record_kept(cfg: SweepConfig, has_trials: bool) -> None:
    """A study without trials beside trial folders lost its record (emptied or replaced):
    running on would train every trial again beside the old ones."""
    folders = [] if has_trials else _trial_like_folders(cfg.out)
    if folders:
        raise OffroadSegError(
            f"{study_location(cfg)}: holds no trials, but {cfg.out / TRIALS_DIR} holds "
            f"{plural(len(folders), 'trial folder')}: the sweep's record is lost; rerun with "
            "--overwrite to start the sweep over, or use another folder"
        )


def prepare_folder(cfg: SweepConfig, identity: dict[str, Any]) -> None:
    """Under the folder's lock: check it again (another process may have started meanwhile),
    remove what killed writers left, start over on --overwrite, and mark a new folder as this
    sweep's (or check that it holds this sweep)."""
    previous = check_folder(cfg)
    removed = remove_stale_temps(cfg.out)
    if removed:
        log.info("removed %s left by killed writers", plural(len(removed), "temporary file"))
    if cfg.overwrite and previous is not None:
        start_over(cfg)
        previous = None
    if previous is None:
        write_record(cfg.out, identity)  # first: it marks the folder as a sweep's
    else:
        check_same_sweep(cfg.out, previous, identity)
