"""Running a sweep: check and prepare its folder and study, then this process's share of the
trials (each one a normal training on the features loaded once), then the leaderboard."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from offroad_seg.config import SweepConfig
from offroad_seg.core import distributed
from offroad_seg.core.text import plural
from offroad_seg.errors import OffroadSegError, TrainingDiverged
from offroad_seg.training.sweep.folder import (
    BEST_LINK,
    TRIALS_DIR,
    check_folder,
    check_record_kept,
    prepare_folder,
    sweep_identity,
    sweep_lock,
)
from offroad_seg.training.sweep.leaderboard import best_row, leaderboard_rows, write_leaderboard
from offroad_seg.training.sweep.space import (
    SAMPLE,
    check_search,
    grid_points,
    sample_index,
    seeded_sampler,
    suggest,
    trial_slug,
)
from offroad_seg.training.sweep.study import (
    STUDY_DB,
    ask_with_heartbeat,
    failed_for_good,
    load_study,
    open_storage,
    reading_study,
    recover_interrupted,
    sqlite_default,
    trial_heartbeat,
)

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    out: Path
    rows: list[dict]  # the leaderboard, best first
    trained: int  # trials this process ran
    seconds: float
    best: Path | None = None
    pruned: int = 0
    failed: list[str] = field(default_factory=list)
    ensemble: dict | None = None  # --ensemble-top: ensemble.json's summary


def sweep(cfg: SweepConfig) -> SweepResult:
    """Run (or resume, or join) the sweep; see the package docstring."""
    started = time.perf_counter()
    grid, distributions = check_search(cfg)
    identity = sweep_identity(cfg)
    world = distributed.from_env()  # under torchrun each rank is a sweep process of its own
    check_folder(cfg)  # before anything is written: another folder is refused untouched
    if not sqlite_default(cfg):
        open_storage(cfg)  # a bad URL: one line, and nothing written
    with contextlib.suppress(FileExistsError):
        cfg.out.mkdir(parents=True, exist_ok=True)
    with sweep_lock(cfg.out):
        prepare_folder(cfg, identity)
        study = _open_study(cfg, grid)
    total = len(grid_points(cfg)) if grid else cfg.trials
    with reading_study(cfg):
        return _run_trials(cfg, study, world, distributions, grid=bool(grid), total=total,
                           started=started)  # fmt: skip


def _open_study(cfg: SweepConfig, grid: dict[str, list]):
    """The study, created or loaded (under the folder's lock), checked against the trial
    folders; trials that killed processes left are enqueued again, and a new grid's points."""
    import optuna

    logging.getLogger("optuna").setLevel(logging.WARNING)
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
        if cfg.prune
        else optuna.pruners.NopPruner()
    )
    if sqlite_default(cfg):  # an emptied or missing study.db: refused before it is made
        db = cfg.out / STUDY_DB
        check_record_kept(cfg, db.is_file() and db.stat().st_size > 0)
    study = load_study(cfg, open_storage(cfg), seeded_sampler(cfg.sampler_seed), pruner)
    check_record_kept(cfg, bool(study.get_trials(deepcopy=False)))
    with reading_study(cfg):
        recovered = recover_interrupted(study)
        if recovered:
            log.info("%s interrupted: starting again", plural(recovered, "trial"))
        if grid and not study.get_trials(deepcopy=False):
            for point in grid_points(cfg):
                study.enqueue_trial(point, user_attrs={"queued": True})
    return study


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
            _run_trial(study, trial, cfg, distributions, data, result, total)
            result.trained += 1
            with sweep_lock(cfg.out):
                rows = write_leaderboard(cfg.out, study)
            best = best_row(rows)
            if best is not None:
                bar.set_postfix_str(f"best {best['val_miou']:.4f}")
    finally:
        bar.n = _finished(study)
        bar.close()
    with sweep_lock(cfg.out):
        if cfg.ensemble_top:  # before the leaderboard, which reports it
            from offroad_seg.training.sweep.ensemble import write_sweep_ensemble

            result.ensemble = write_sweep_ensemble(cfg, leaderboard_rows(cfg.out, study), device)
        result.rows = write_leaderboard(cfg.out, study)
    best_link = cfg.out / BEST_LINK
    result.best = best_link.resolve() if best_link.exists() else None
    result.seconds = time.perf_counter() - started
    return result


def _finished(study) -> int:
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED)
    failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
              if failed_for_good(t)]  # fmt: skip
    return len(study.get_trials(deepcopy=False, states=done)) + len(failed)


def _next_trial(study, cfg: SweepConfig, grid: bool, total: int):
    """The next trial for this process, or None when the sweep is done. The check and the ask
    happen under the machine's lock, so two processes never take the same last trial (on
    several machines the study's trial numbers decide: see `spare`). Trials of processes that
    died meanwhile, here or on another machine, are enqueued again first."""
    from optuna.trial import TrialState

    with sweep_lock(cfg.out):
        recovered = recover_interrupted(study)
        if recovered:
            log.info("%s of dead processes: starting again", plural(recovered, "trial"))
        trials = study.get_trials(deepcopy=False)
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        if grid and not waiting:
            return None
        if not grid and not waiting:
            taken = [t for t in trials if t.state != TrialState.FAIL or failed_for_good(t)]
            if len(taken) >= total:
                return None
        trial = ask_with_heartbeat(study)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        if not grid and SAMPLE not in trial.user_attrs:
            trial.set_user_attr(SAMPLE, sample_index(study, trial))
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


def trial_position(cfg: SweepConfig, trial, params: dict) -> int:
    """The trial's number as shown, 1 to the sweep's size: its grid point's, or its sample
    index's. Optuna's own trial numbers are not: an interrupted trial keeps its number and is
    asked again under a new one, and asks beyond the last sample take numbers too, so they
    skip after a resume."""
    if SAMPLE in trial.user_attrs:
        return trial.user_attrs[SAMPLE] + 1
    points = grid_points(cfg)
    return points.index(params) + 1 if params in points else trial.number + 1


def _run_trial(
    study, trial, cfg: SweepConfig, distributions, data, result: SweepResult, total: int
) -> None:
    import optuna
    from optuna.trial import TrialState

    from offroad_seg.training.loop import train

    params = {name: suggest(trial, name, dist) for name, dist in distributions.items()}
    slug = trial_slug(params, trial.user_attrs.get(SAMPLE))
    shown = f"trial {trial_position(cfg, trial, params)}/{total}"
    trial.set_user_attr("run", slug)
    run_cfg = replace(
        cfg.train,
        **params,
        out=cfg.out / TRIALS_DIR / slug,
        resume=False,
        overwrite=True,  # an interrupted attempt of the same settings starts over
        progress=False,
    )

    last: dict = {}

    def report(row: dict) -> None:
        last.update(row)
        trial.report(row["val_miou"], row["epoch"])
        if trial.should_prune():
            raise optuna.TrialPruned

    log.info("%s: %s", shown, slug)
    epochs_log = logging.getLogger("offroad_seg.training.loop")
    level = epochs_log.level
    epochs_log.setLevel(max(level, logging.WARNING))  # one line per trial, not per epoch
    try:
        with trial_heartbeat(study, trial):
            outcome = train(run_cfg, data=data, on_epoch=report, world=distributed.SINGLE)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
        result.pruned += 1
        log.info(
            "%s: pruned after epoch %d (val mIoU %.4f, below the median of earlier trials)",
            shown, last["epoch"], last["val_miou"],
        )  # fmt: skip
        return
    except optuna.exceptions.UpdateFinishedTrialError:  # report() to a trial failed meanwhile
        _declared_dead(cfg, trial)
        return
    except TrainingDiverged as e:  # NaN/inf loss: final, a rerun does not retry it
        trial.set_user_attr("diverged_epoch", e.epoch)
        _record_failure(study, trial, slug, e, result, shown)
        return
    except OffroadSegError as e:  # settings that cannot be trained (e.g. a width for linear)
        _record_failure(study, trial, slug, e, result, shown)
        return
    finally:
        epochs_log.setLevel(level)
    told = study.tell(trial, outcome.best["val_miou"], skip_if_finished=True)
    if told.state != TrialState.COMPLETE:
        _declared_dead(cfg, trial)
        return
    log.info("%s: val mIoU %.4f", shown, outcome.best["val_miou"])


def _declared_dead(cfg: SweepConfig, trial) -> None:
    """The study failed this trial while it ran: its heartbeats did not reach the database
    for `stale_after_s` and another process enqueued it again. Its result is dropped (the
    retry's counts), and the sweep goes on."""
    log.warning(
        "trial %d: declared dead by another process (no heartbeat in the study for %d s) and "
        "started again there; this result is dropped",
        trial.number,
        cfg.stale_after_s,
    )


def _record_failure(
    study, trial, slug: str, e: OffroadSegError, result: SweepResult, shown: str
) -> None:
    import optuna
    from optuna.trial import TrialState

    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # declared dead
        trial.set_user_attr("error", reason)
    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    result.failed.append(f"{slug}: {reason}")
    log.warning("%s failed: %s", shown, reason)
