"""Output folders of evaluate and predict: what run a folder holds, what it wrote there, and
per-image records.

A folder made by evaluate or predict holds `.offroad-seg-run.json`: the settings that decide
its outputs (head, inputs, TTA, ...), and a ledger of what the run made besides per-image files
(the folders it created, its run-level files: summaries, report, plots), written before any of
them. Rerunning the same command finds it and resumes; another command into the same folder is
refused, naming the setting that differs, unless `--overwrite`, which first removes exactly
what the earlier run recorded writing, and a folder only if the run created it and it is empty
then. Files it did not write stay: a user's file with the name of an output the new run would
write is refused in one line, never replaced.

Each image's outputs are announced (a `writing` line listing them) before they are written, then
written atomically, then one line (a JSON record: what the metrics need of that image) is
appended to `records/rank-R.jsonl`; a record's presence means the image is done, and the
`writing` lines tell `--overwrite` every file a run may have left, even one killed mid-write.
Each torchrun rank appends to its own file; a killed process leaves at most a torn last line
(no newline), which readers skip and the next writer of that file cuts off.

Per-image outputs of runs of many images are nested in subfolders (`data.layout`); the
resume check (`done_records`) reads only the start of each line (the key and the index), so
it stays fast at a million records.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from offroad_seg.core.atomic import remove_stale_temps, write_json_atomic
from offroad_seg.errors import OffroadSegError

log = logging.getLogger(__name__)

RUN_FILE = ".offroad-seg-run.json"
RECORDS_DIR = "records"
LEDGER = "ledger"  # the run file's entry of what the run made; not a setting

# Per-image outputs a record of an older version (no `writing` lines) may stand for: folder ->
# its file name from the image's output name (`x.png`).
_LEGACY_IMAGE_FILES = {
    "masks": "{name}",
    "masks_color": "{name}",
    "comparisons": "{name}",
    "overlays": "{name}",
    "thumbnails": "{stem}.jpg",
}


_LEGACY_RUN_FILES = {
    "evaluate": ["evaluation_metrics.txt", "report.html", "metrics.json",
                 "per_class_metrics.png", "confusion_matrix.png"],
    "predict": ["predictions.json"],
}  # fmt: skip


@dataclass(frozen=True)
class RunPlan:
    """What a run will write in its folder, known before it starts: the folders it uses, its
    run-level files, every image's files (relative paths, '/'-separated) and patterns (regular
    expressions) for the files whose names are known only while it runs (video frames)."""

    folders: tuple[str, ...]
    files: tuple[str, ...]
    image_files: frozenset[str] = frozenset()
    patterns: tuple[str, ...] = ()
    _compiled: tuple[re.Pattern, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", tuple(re.compile(p) for p in self.patterns))

    def writes(self, relative: str) -> bool:
        return relative in self.image_files or any(p.fullmatch(relative) for p in self._compiled)

    def clashes(self, out: Path) -> list[str]:
        """Entries already in `out` with the name of a file this run would write."""
        found = [name for name in self.files if os.path.lexists(out / name)]
        for folder in self.folders:
            try:
                names = sorted(os.listdir(out / folder))
            except (FileNotFoundError, NotADirectoryError):
                continue
            found += [f"{folder}/{n}" for n in names if self.writes(f"{folder}/{n}")]
        return found


# Settings recorded as digests or lists: named, not shown (their values say nothing to a reader).
_DIGESTS = {
    "head_sha256": "the head file's contents",
    "sources": "the images or masks",
    "images": "the images",
    "videos": "the videos",
}


def _run_difference(previous: dict[str, Any], identity: dict[str, Any]) -> str:
    """What differs between the run a folder holds and this one, in words: the other command,
    or up to three settings with that run's value first ('tta none then, flip now')."""
    if previous.get("command") != identity.get("command"):
        return f"of {previous.get('command') or 'another command'}; this is {identity['command']}"
    keys = [k for k in sorted((set(identity) | set(previous)) - {LEDGER})
            if identity.get(k) != previous.get(k)]  # fmt: skip
    shown = []
    for k in keys[:3]:
        if k in _DIGESTS:
            shown.append(f"other {_DIGESTS[k]}")
        else:
            shown.append(f"{k} {_setting(previous.get(k))} then, {_setting(identity.get(k))} now")
    return "; ".join(shown) + (f"; {len(keys) - 3} more" if len(keys) > 3 else "")


def _setting(value: Any) -> str:
    """A recorded setting as a user would type it: no quotes, no None."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(_setting(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def prepare_run_folder(
    out: Path, identity: dict[str, Any], overwrite: bool, plan: RunPlan | None = None
) -> bool:
    """Make `out` ready for the run `identity` that writes `plan`; True when it resumes an
    earlier one. Refuses a folder holding another run's results unless `overwrite`, which
    removes what that run recorded writing (see the module docstring), and refuses, even with
    `overwrite`, a file the run would write that no run record lists (a user's file).
    Dead writers' temporary files in the folder are removed either way."""
    plan = plan or RunPlan(folders=(), files=())
    previous = _read_run_file(out / RUN_FILE)
    if previous is not None and not overwrite:
        differences = [k for k in sorted((set(identity) | set(previous)) - {LEDGER})
                       if identity.get(k) != previous.get(k)]  # fmt: skip
        if not differences:
            _remove_stale_temps(out, plan.folders)
            return True
        raise OffroadSegError(
            f"{out}: holds the results of another run ({_run_difference(previous, identity)}); "
            "use another folder, or --overwrite to replace them"
        )
    replaced = run_files(out, previous) if previous is not None else set()
    clashes = [name for name in plan.clashes(out) if name not in replaced]
    if clashes:  # refused before anything is touched
        more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
        raise OffroadSegError(
            f"{out / clashes[0]}{more}: not written by offroad-seg (no run record lists it), "
            "and this run would replace it; move it away or use another output folder"
        )
    made_before: list[str] = []  # folders an earlier run created: still the tool's
    if previous is not None:
        made_before = list(_ledger(previous).get("folders", []))
        remove_run(out, previous)
    _remove_stale_temps(out, plan.folders)
    folders = dict.fromkeys((*plan.folders, RECORDS_DIR))
    created = [f for f in folders if f in made_before or not (out / f).is_dir()]
    out.mkdir(parents=True, exist_ok=True)
    # the ledger first: whatever happens next, --overwrite knows what this run may leave
    ledger = {"folders": created, "files": list(plan.files)}
    write_json_atomic(out / RUN_FILE, {**identity, LEDGER: ledger})
    for folder in created:
        (out / folder).mkdir(parents=True, exist_ok=True)
    return False


def _read_run_file(path: Path) -> dict[str, Any] | None:
    """The run file's content; None when there is none, {} when unreadable."""
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def _remove_stale_temps(out: Path, folders: Iterable[str]) -> None:
    for folder in (".", *folders, RECORDS_DIR):
        for path in remove_stale_temps(out / folder):
            log.info("removed %s, left by a killed writer", path)


def remove_run(out: Path, previous: dict[str, Any]) -> None:
    """Remove what the run of the run file `previous` recorded writing in `out`: every file
    its records announce, its run-level files, its records, the folders it created if they are
    empty then, and the run file last (so that an interrupted removal is redone by the next
    --overwrite). Anything else in `out` stays."""
    ledger = _ledger(previous)
    for relative in sorted(run_files(out, previous)):
        _remove_file(out, relative)
    records = out / RECORDS_DIR
    for path in sorted(records.glob("rank-*.jsonl")) if records.is_dir() else []:
        path.unlink(missing_ok=True)
    for folder in reversed(ledger.get("folders", [])):
        if _inside(folder):
            remove_stale_temps(out / folder)
            with contextlib.suppress(OSError):  # not empty (a user's file), or gone already
                (out / folder).rmdir()
    (out / RUN_FILE).unlink(missing_ok=True)


def _ledger(previous: dict[str, Any]) -> dict[str, Any]:
    ledger = previous.get(LEDGER)
    if not isinstance(ledger, dict):  # an older version's run file: its command's files
        ledger = {"files": _LEGACY_RUN_FILES.get(previous.get("command"), [])}
    return ledger


def run_files(out: Path, previous: dict[str, Any]) -> set[str]:
    """The files (relative paths) that the run of the run file `previous` recorded writing in
    `out`: every image's, and its run-level files."""
    files = [f for f in _ledger(previous).get("files", []) if isinstance(f, str)]
    return {f for f in (*recorded_files(out), *files) if _inside(f)}


def _inside(relative: Any) -> bool:
    """A relative path that stays inside the run folder (a record is never trusted further)."""
    if not isinstance(relative, str) or not relative:
        return False
    path = PurePosixPath(relative)
    return not path.is_absolute() and ".." not in path.parts and "\\" not in relative


def _remove_file(out: Path, relative: Any) -> None:
    if not _inside(relative):
        return
    path = out / relative
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)


def recorded_files(out: Path) -> set[str]:
    """Every per-image file the records in `out` announce (relative paths). A record without
    a `writing` line (an older version's) stands for its image's usual outputs."""
    announced: set[str] = set()
    keys_announced: set[str] = set()
    legacy: set[str] = set()
    for line in _record_lines(out):
        head = _ENTRY_HEAD.match(line)
        if head is not None and head[2] is not None and line.endswith("}\n"):
            legacy.add(_key(head))  # a record: only its key matters here, read from its start
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(entry, dict):
            continue
        key = entry.get("key")
        if "writing" in entry:
            keys_announced.add(key)
            announced.update(f for f in entry["writing"] if isinstance(f, str))
        elif isinstance(key, str):
            legacy.add(key)
    for key in legacy - keys_announced:
        announced.update(_legacy_files(out, key))
    return announced


def _legacy_files(out: Path, key: str) -> list[str]:
    if key.startswith("video:"):
        stem = Path(key[len("video:") :]).stem
        frame = re.compile(rf"{re.escape(stem)}_f\d{{6,}}\.png")
        files = [f"overlays/{stem}.mp4"]
        for folder in ("masks", "masks_color"):
            names = os.listdir(out / folder) if (out / folder).is_dir() else []
            files += [f"{folder}/{n}" for n in names if frame.fullmatch(n)]
        return files
    name = Path(key).stem + ".png"
    return [
        f"{folder}/{pattern.format(name=name, stem=Path(key).stem)}"
        for folder, pattern in _LEGACY_IMAGE_FILES.items()
    ]


class RecordLog:
    """Appends per-image records (JSON lines) for one rank; safe to call from writer threads."""

    def __init__(self, out: Path, rank: int) -> None:
        folder = out / RECORDS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rank-{rank}.jsonl"
        self._lock = threading.Lock()
        _cut_torn_line(self.path)  # every line ending in a newline is then a whole entry
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close)

    def intend(self, key: str, files: Sequence[str]) -> None:
        """Announce the files (relative to the run folder) about to be written for `key`: what
        --overwrite removes, even if the run is killed before the record."""
        self._write({"key": key, "writing": list(files)})

    def append(self, record: dict[str, Any]) -> None:
        """The record of a done image (or video), after its files."""
        self._write(record)

    def _write(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, separators=(",", ":"), allow_nan=False)
        with self._lock:
            try:
                self._file.write(line + "\n")
                self._file.flush()
            except OSError as e:  # a file object's error names no file (disk full, ...)
                raise OSError(e.errno, e.strerror, str(self.path)) from e

    def close(self) -> None:
        self._file.close()


def read_records(out: Path) -> dict[str, dict[str, Any]]:
    """Every complete record of every rank, by key ('key' field), the last one winning
    (`writing` lines are announcements, not records)."""
    return {e["key"]: e for e in _entries(out) if "writing" not in e and "key" in e}


def _entries(out: Path) -> Iterable[dict[str, Any]]:
    """Every complete line of every rank's records, parsed."""
    for line in _record_lines(out):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn line an older version ended with a newline: that image is redone
        if isinstance(entry, dict):
            yield entry


# The start of an entry as RecordLog writes it: the key, then the index (an image's record)
# or the announced files (a `writing` line).
_ENTRY_HEAD = re.compile(r'\{"key":("(?:[^"\\]|\\.)*"),(?:"i":(\d+)[,}]|("writing":))')


def done_records(out: Path) -> dict[str, int | None]:
    """The keys of every complete record in `out` (what `read_records` holds) and their image
    index (None for a video's). Reads only each line's start where it has RecordLog's layout
    (a million records in a few seconds, where parsing them all takes a minute); any other
    line is parsed whole."""
    done: dict[str, int | None] = {}
    for line in _record_lines(out):
        head = _ENTRY_HEAD.match(line)
        if head is None or not line.endswith("}\n"):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and "writing" not in entry and "key" in entry:
                done[entry["key"]] = entry.get("i")
            continue
        if head[3]:  # an announcement
            continue
        done[_key(head)] = int(head[2])
    return done


def _key(head: re.Match) -> str:
    quoted = head[1]
    return json.loads(quoted) if "\\" in quoted else quoted[1:-1]


def _record_lines(out: Path) -> Iterable[str]:
    folder = out / RECORDS_DIR
    for path in sorted(folder.glob("rank-*.jsonl")) if folder.is_dir() else []:
        yield from _lines(path)


def _cut_torn_line(path: Path) -> None:
    """Cut off a last line without its newline (its writer was killed while writing it; its
    image, whose files come after its announcement and before its record, is redone)."""
    try:
        f = open(path, "r+b")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        return
    with f:
        size = f.seek(0, 2)
        end = size
        while end > 0:
            step = min(end, 1 << 16)
            f.seek(end - step)
            block = f.read(step)
            newline = block.rfind(b"\n")
            if newline >= 0:
                end = end - step + newline + 1
                break
            end -= step
        if end < size:
            f.truncate(end)


def _lines(path: Path) -> Iterable[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                yield line
