"""A training run's output folder: who may write it, what state it is in, what a rerun does.

OUT holds segmentation_head.pth, last.pth and train_stats/. A run writes train_stats/config.json
first, then after every epoch the best head, last.pth and history.json; once every epoch is
trained, history.csv, evaluation_metrics.txt and the plots, and history.json last of all,
marked finished. One `train` at a time writes a folder: a kernel-released lock, as extract
takes on its cache, so a killed owner leaves no stale lock. What the folder holds decides
what a rerun does:

- no run (empty), or the start of one that saved no epoch (config.json, maybe that start's
  first head, no last.pth): a fresh run; `--resume` starts that run over with its settings;
- last.pth of a run with epochs left: `--resume` continues it; a plain rerun is refused;
- last.pth of a run with every epoch trained whose outputs are not all written (killed while
  writing them): `--resume`, or the same command, writes them from the checkpoints and the
  saved history, without training;
- a finished run: `--resume` has nothing to do; a plain rerun is refused.

`--overwrite` removes the run's own files (checkpoints, and the stats named below when
train_stats/config.json is a run record) before training; other files stay.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from offroad_seg.config import RUN_SETTINGS, TrainConfig, apply_preset, default
from offroad_seg.core.atomic import remove_stale_temps
from offroad_seg.core.distributed import World
from offroad_seg.core.lock import writer_lock
from offroad_seg.errors import ConfigError, OffroadSegError
from offroad_seg.models.checkpoint import HEAD_FILE, load_checkpoint

log = logging.getLogger(__name__)

LAST_FILE = "last.pth"
STATS_DIR = "train_stats"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
# written once every epoch is trained; history.json (marked finished) comes last
FINAL_STATS = ("history.csv", "evaluation_metrics.txt", "training_curves.png")
VAL_STATS = ("per_class_metrics.png",)  # runs with a validation cache only
FINISHED = "finished"  # history.json's mark: every output of the run is written


@contextlib.contextmanager
def output_lock(out: Path, world: World) -> Iterator[None]:
    """Hold OUT's writer lock (rank 0; the other ranks write nothing there) while a run uses
    it, after removing the temporary files that dead writers left there. A folder the lock
    created is removed again when nothing was written into it (a refused run leaves none)."""
    if not world.is_main:
        yield
        return
    out = Path(out)
    created = [p for p in (out, *out.parents) if not p.exists()]  # innermost first
    try:
        with writer_lock(out, "train"):
            for folder in (out, out / STATS_DIR):
                for path in remove_stale_temps(folder):
                    log.info("removed %s, left by a killed run", path)
            yield
    finally:
        for folder in created:
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break


def config_dict(cfg: TrainConfig) -> dict:
    """A run's settings as JSON-ready values."""
    d = asdict(cfg)
    d["caches"] = [str(p) for p in cfg.caches]
    d["out"] = str(cfg.out)
    d["val_cache"] = str(cfg.val_cache) if cfg.val_cache else None
    d["tensorboard"] = str(cfg.tensorboard) if cfg.tensorboard else None
    return d


def same_run(a: dict, b: dict) -> bool:
    """Whether two runs' settings (config_dict's) train the same head on the same caches."""
    # a setting missing from a record written by an older version ran with its default
    settings = {k: default(TrainConfig, k) for k in RUN_SETTINGS}
    keys = (*RUN_SETTINGS, "caches", "val_cache")
    return all(
        _as_json(a.get(k, settings.get(k))) == _as_json(b.get(k, settings.get(k))) for k in keys
    )


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def read_run_record(out: Path) -> dict | None:
    """train_stats/config.json when it is a run record this tool wrote, else None."""
    try:
        record = json.loads((out / STATS_DIR / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(record, dict) and "tool_version" in record and "settings" in record:
        return record
    return None


def missing_outputs(out: Path, with_val: bool) -> list[str]:
    """The outputs of a run whose epochs are all trained that are not (all) written."""
    names = [HEAD_FILE, LAST_FILE]
    names += [f"{STATS_DIR}/{n}" for n in (CONFIG_FILE, *FINAL_STATS)]
    names += [f"{STATS_DIR}/{n}" for n in VAL_STATS] if with_val else []
    missing = [n for n in names if not (out / n).is_file()]
    try:
        finished = json.loads((out / STATS_DIR / HISTORY_FILE).read_text()).get(FINISHED)
    except (OSError, ValueError, AttributeError):
        finished = False
    if finished is not True:
        missing.append(f"{STATS_DIR}/{HISTORY_FILE}")
    return missing


def resumed_config(cfg: TrainConfig, saved: dict, source: Path) -> TrainConfig:
    """The settings of the run saved in `source` (last.pth, or the config.json of a start
    that saved no epoch), for `--resume`: a setting left at its default takes the run's
    value; one given with another value is refused by name, since it would make the run
    something else than it was."""
    changes: dict = {}
    for name in RUN_SETTINGS:
        if name not in saved:  # written by an older version: it ran with the default
            continue
        ours, theirs = getattr(cfg, name), saved[name]
        if ours != default(TrainConfig, name) and ours != theirs:
            option = "--" + name.replace("_", "-")
            raise ConfigError(
                f"{source}: the run was trained with {option} {theirs}; --resume continues it "
                f"as it was, so {option} {ours} is refused (train into another folder, or "
                "--overwrite, to change it)"
            )
        changes[name] = theirs
    if cfg.val_cache is None and saved.get("val_cache"):
        changes["val_cache"] = saved["val_cache"]
    return replace(cfg, **changes)


@dataclass
class RunPlan:
    """What a `train` command does with its folder: the settings it trains with (resume's
    applied), the run it continues (last.pth's payload) and our files it removes first."""

    cfg: TrainConfig
    last: dict | None = None
    remove: list[Path] = field(default_factory=list)

    def clean(self) -> None:
        for path in self.remove:
            path.unlink(missing_ok=True)
            log.info("removed %s", path)


def plan_run(cfg: TrainConfig) -> RunPlan:
    """Decide from OUT's content what this command does (see the module docstring); refuse,
    in one line saying what to do, what it must not do. Reads only: `RunPlan.clean` removes."""
    out = Path(cfg.out)
    if cfg.overwrite and not cfg.resume:
        return RunPlan(apply_preset(cfg), remove=_own_outputs(out))
    if (out / LAST_FILE).exists():
        return _plan_with_last(cfg, load_checkpoint(out / LAST_FILE).payload)
    return _plan_without_last(cfg)


def _plan_with_last(cfg: TrainConfig, last: dict) -> RunPlan:
    out, saved = Path(cfg.out), last["train_config"]
    if cfg.resume:
        return RunPlan(apply_preset(resumed_config(cfg, saved, out / LAST_FILE)), last)
    cfg = apply_preset(cfg)
    epoch, epochs = last["epoch"], saved["epochs"]
    if epoch < epochs and not last.get("stopped_early"):
        raise OffroadSegError(
            f"{out}: already holds a trained head (last.pth, epoch {epoch} of {epochs}); "
            "use --resume to continue it or --overwrite to start over"
        )
    missing = missing_outputs(out, bool(saved.get("val_cache")))
    if missing and same_run(config_dict(cfg), saved):
        return RunPlan(replace(cfg, resume=True), last)  # finish writing its outputs
    trained = f"all {epochs} epochs" if epoch >= epochs else f"stopped early at epoch {epoch}"
    raise OffroadSegError(
        f"{out}: already holds a trained head ({trained} of a run); "
        "use --resume to continue it or --overwrite to start over"
    )


def _plan_without_last(cfg: TrainConfig) -> RunPlan:
    out = Path(cfg.out)
    record = read_run_record(out)
    if cfg.resume:
        if record is None:
            raise OffroadSegError(
                f"{out / LAST_FILE}: nothing to resume (no run was started in {out}); "
                "train without --resume"
            )
        cfg = resumed_config(cfg, record["settings"], out / STATS_DIR / CONFIG_FILE)
        cfg = replace(cfg, resume=False)
    cfg = apply_preset(cfg)
    head = out / HEAD_FILE
    remove = []
    if head.exists():
        if not _head_of_start(head, record):
            raise OffroadSegError(
                f"{out}: already holds a trained head ({HEAD_FILE}, but no {LAST_FILE} to "
                "resume); use another folder, or --overwrite to replace it"
            )
        remove.append(head)
    if record is not None:
        log.info("%s: the run started there saved no epoch; starting it over", out)
    return RunPlan(cfg, remove=remove)


def _head_of_start(head: Path, record: dict | None) -> bool:
    """Whether `head` is the first head of the run that `record` started (a run killed, or out
    of disk space, between saving its first head and its first last.pth)."""
    if record is None:
        return False
    try:
        saved = load_checkpoint(head).payload.get("train_config") or {}
    except OffroadSegError:
        return False
    return same_run(record["settings"], saved)


def _own_outputs(out: Path) -> list[Path]:
    """What --overwrite removes: the checkpoints (which it replaces anyway), and the stats when
    train_stats/config.json says this tool wrote the folder."""
    paths = [out / HEAD_FILE, out / LAST_FILE]
    if read_run_record(out) is not None:
        stats = (CONFIG_FILE, HISTORY_FILE, *FINAL_STATS, *VAL_STATS)
        paths += [out / STATS_DIR / n for n in stats]
    return [p for p in paths if p.is_file()]
