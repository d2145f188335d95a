"""Output folders of evaluate and predict: what run a folder holds, and per-image records.

A folder made by evaluate or predict holds `.offroad-seg-run.json`, the settings that decide
its outputs (head, inputs, TTA, ...). Rerunning the same command finds it and resumes; another
command into the same folder is refused, naming the setting that differs, unless
`--overwrite`, which first removes everything offroad-seg wrote there (files it did not write
stay), so old and new results never mix.

Each image's outputs are written atomically, then one line (a JSON record: what the metrics
need of that image) is appended to `records/rank-R.jsonl`; a record's presence means the
image is done. Each torchrun rank appends to its own file; a killed process leaves at most a
torn last line, which readers skip.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from offroad_seg.core.atomic import write_json_atomic
from offroad_seg.errors import OffroadSegError

log = logging.getLogger(__name__)

RUN_FILE = ".offroad-seg-run.json"
RECORDS_DIR = "records"

# Everything evaluate and predict write, in any version: what --overwrite removes.
OUTPUT_NAMES = (
    RUN_FILE,
    RECORDS_DIR,
    "masks",
    "masks_color",
    "comparisons",
    "overlays",
    "thumbnails",
    "report.html",
    "evaluation_metrics.txt",
    "metrics.json",
    "per_class_metrics.png",
    "confusion_matrix.png",
    "predictions.json",
)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def prepare_run_folder(out: Path, identity: dict[str, Any], overwrite: bool) -> bool:
    """Make `out` ready for the run `identity`; True when it resumes an earlier one.

    Refuses a folder holding another run's results (or results of a version without a run
    file) unless `overwrite`, which removes them first."""
    run_file = out / RUN_FILE
    ours = [name for name in OUTPUT_NAMES if (out / name).exists()]
    if run_file.exists() and not overwrite:
        try:
            previous = json.loads(run_file.read_text())
        except (OSError, json.JSONDecodeError):
            previous = {}
        differences = [k for k in sorted(set(identity) | set(previous))
                       if identity.get(k) != previous.get(k)]  # fmt: skip
        if not differences:
            return True
        shown = "; ".join(
            f"{k} {previous.get(k)!r} vs {identity.get(k)!r}" for k in differences[:3]
        )
        raise OffroadSegError(
            f"{out}: holds the results of another run ({shown}); use another folder, or "
            "--overwrite to replace them"
        )
    if ours and not overwrite:
        raise OffroadSegError(
            f"{out}: already holds results ({ours[0]}); use --overwrite to replace them"
        )
    for name in ours:  # start clean so old files never mix with new ones
        _remove(out / name)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_file, identity)
    return False


class RecordLog:
    """Appends per-image records (JSON lines) for one rank; safe to call from writer threads."""

    def __init__(self, out: Path, rank: int) -> None:
        folder = out / RECORDS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rank-{rank}.jsonl"
        self._lock = threading.Lock()
        torn = self.path.exists() and not _ends_with_newline(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close)
        if torn:  # a line cut by a killed writer: end it, so the next record starts clean
            self._file.write("\n")

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), allow_nan=False)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_records(out: Path) -> dict[str, dict[str, Any]]:
    """Every complete record of every rank, by key ('key' field), the last one winning."""
    records: dict[str, dict[str, Any]] = {}
    folder = out / RECORDS_DIR
    for path in sorted(folder.glob("rank-*.jsonl")) if folder.is_dir() else []:
        for line in _lines(path):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a killed writer: that image is redone
            records[record["key"]] = record
    return records


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, 2)
        if f.tell() == 0:
            return True
        f.seek(-1, 2)
        return f.read(1) == b"\n"


def _lines(path: Path) -> Iterable[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                yield line
