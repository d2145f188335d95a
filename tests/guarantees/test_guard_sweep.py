"""Sweeps under hostile conditions (issue #21): a folder that is not a sweep is refused
untouched; --overwrite removes only what the sweep wrote; a killed sampled search resumes to
the samples of an uninterrupted one; a diverged trial is recorded as failed and the sweep
goes on; a damaged study.db or sweep.json and a bad --storage are one line; temporary files
of killed writers go."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from offroad_seg.cli import cli
from offroad_seg.errors import TrainingDiverged

GRID = ["--grid", "lr=1e-3,2e-3"]
FAST = ["--head", "linear", "--epochs", "1", "--device", "cpu"]
RANGE = ["--range", "lr=1e-4:1e-3:log", "--trials", "3"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def sweep_args(caches, out, *extra) -> list:
    return ["sweep", caches["train"], out, "--val-cache", caches["val"], *FAST, *extra]


def sweep_command(caches, out, *extra) -> list[str]:
    return [sys.executable, "-m", "offroad_seg", *map(str, sweep_args(caches, out, *extra))]


def assert_one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def leaderboard(out: Path) -> list[dict]:
    with open(out / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row.pop("s_per_epoch", None)  # a time, not a result
    return rows


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under `folder` (hidden ones too) with its content or link target."""
    found: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = path.read_bytes()
    return found


def study_trials(out: Path):
    import optuna

    study = optuna.load_study(
        study_name="offroad-seg-sweep", storage=f"sqlite:///{out / 'study.db'}"
    )
    return study.get_trials()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def finished(caches, tmp_path_factory) -> Path:
    """A finished two-trial grid sweep; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("guard") / "grid"
    r = run(*sweep_args(caches, out, *GRID))
    assert r.exit_code == 0, r.output
    assert len(leaderboard(out)) == 2
    return out


def copy_of(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "sweep"
    shutil.copytree(finished, out, symlinks=True)
    return out


# ----------------------------------------------------------------------------- item 3


def user_folder(root: Path) -> Path:
    """A folder of the user's that happens to hold names a sweep writes."""
    out = root / "mine"
    (out / "trials" / "experiment-1").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes\n")
    (out / "leaderboard.csv").write_text("name,score\nalice,3\n")
    (out / "trials" / "experiment-1" / "result.txt").write_text("0.5\n")
    (out / "study.db").write_bytes(b"my own database")
    return out


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_is_not_a_sweep_is_refused_untouched(caches, tmp_path, overwrite):
    out = user_folder(tmp_path)
    before = snapshot(out)
    extra = ["--overwrite"] if overwrite else []
    r = run(*sweep_args(caches, out, *GRID, *extra))
    assert_one_line_error(r, str(out), "not a sweep folder")
    assert snapshot(out) == before  # not even the lock file


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_sweep_json_that_is_not_ours_is_refused_untouched(caches, tmp_path, overwrite):
    out = user_folder(tmp_path)
    (out / "sweep.json").write_text('{"method": "bayes", "metric": "loss"}\n')  # another tool's
    before = snapshot(out)
    extra = ["--overwrite"] if overwrite else []
    r = run(*sweep_args(caches, out, *GRID, *extra))
    assert_one_line_error(r, str(out / "sweep.json"), "not an offroad-seg sweep")
    assert snapshot(out) == before


def test_overwrite_removes_only_what_the_sweep_wrote(finished, caches, tmp_path):
    out = copy_of(finished, tmp_path)
    old_runs = sorted(p.name for p in (out / "trials").iterdir())
    (out / "notes.txt").write_text("keep me\n")
    (out / "trials" / "README.txt").write_text("keep me too\n")
    (out / "trials" / "by-hand").mkdir()
    (out / "trials" / "by-hand" / "model.pth").write_bytes(b"mine")
    assert json.loads((out / "sweep.json").read_text())["kind"] == "offroad-seg sweep"
    r = run(*sweep_args(caches, out, "--grid", "lr=3e-3,4e-3", "--overwrite"))
    assert r.exit_code == 0, r.output
    assert (out / "notes.txt").read_text() == "keep me\n"
    assert (out / "trials" / "README.txt").read_text() == "keep me too\n"
    assert (out / "trials" / "by-hand" / "model.pth").read_bytes() == b"mine"
    for name in old_runs:
        assert not (out / "trials" / name).exists()
    rows = leaderboard(out)
    assert sorted(row["lr"] for row in rows) == ["0.003", "0.004"]
    assert sorted(p.name for p in (out / "trials").iterdir()) == sorted(
        [row["run"] for row in rows] + ["README.txt", "by-hand"]
    )
    assert json.loads((out / "sweep.json").read_text())["grid"] == {"lr": [3e-3, 4e-3]}


def test_a_sweep_killed_as_it_started_is_resumed(caches, tmp_path):
    """Only the lock (and sweep.json's temporary file of a dead writer): a sweep of ours that
    died before writing sweep.json, not a user's folder."""
    out = tmp_path / "started"
    out.mkdir()
    (out / ".sweep.lock").touch()
    host = socket.gethostname()
    (out / f".sweep.json.{host}-{dead_pid()}.0123abcd.tmp").write_text('{"kin')
    r = run(*sweep_args(caches, out, *GRID))
    assert r.exit_code == 0, r.output
    assert len(leaderboard(out)) == 2
    assert not list(out.glob(".sweep.json.*.tmp"))


# ----------------------------------------------------------------------------- item 4


def sampled_lrs(out: Path) -> list[float]:
    """The lr of each sample index, from the study (retries carry their sample's index)."""
    done = [t for t in study_trials(out) if t.state.name == "COMPLETE"]
    by_index = {t.user_attrs["sample"]: t.params["lr"] for t in done}
    assert len(by_index) == len(done), "a sample index trained twice"
    return [by_index[k] for k in sorted(by_index)]


@pytest.fixture(scope="module")
def sampled(caches, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("guard") / "sampled"
    r = run(*sweep_args(caches, out, *RANGE))
    assert r.exit_code == 0, r.output
    return out


def test_a_killed_sampled_sweep_resumes_to_the_samples_of_an_uninterrupted_one(
    sampled, caches, tmp_path
):
    expected = sampled_lrs(sampled)
    assert len(expected) == 3 and len(set(expected)) == 3
    out = tmp_path / "killed"
    command = sweep_command(caches, out, *RANGE)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "leaderboard.csv").exists():  # the first trial has finished
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(leaderboard(out)) < 3, "the sweep finished before the kill"
    r = run(*sweep_args(caches, out, *RANGE))
    assert r.exit_code == 0, r.output
    rows = leaderboard(out)
    assert rows == leaderboard(sampled)  # the same runs, the same scores
    assert len({row["run"] for row in rows}) == 3
    assert sampled_lrs(out) == expected
    assert sorted(p.name for p in (out / "trials").iterdir()) == sorted(r["run"] for r in rows)
    assert sorted(row["run"][:4] for row in rows) == ["000-", "001-", "002-"]


def test_two_processes_on_a_sampled_search_draw_the_samples_of_one(sampled, caches, tmp_path):
    """The sample index, not the process, picks the random stream: two processes started
    at once neither repeat each other's samples nor draw others than one process does (the
    first samples of TPE are random draws, independent of the trials finished before)."""
    out = tmp_path / "two"
    procs = [
        subprocess.Popen(sweep_command(caches, out, *RANGE), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    trained = 0
    for proc in procs:
        stdout, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        trained += int(re.search(r"(\d+) trials? trained by this process", stdout)[1])
    assert trained == 3  # no trial twice
    assert sampled_lrs(out) == sampled_lrs(sampled)
    assert leaderboard(out) == leaderboard(sampled)


# ----------------------------------------------------------------------------- item 12


@pytest.fixture
def diverging(monkeypatch):
    """train raises TrainingDiverged for lr 2e-3 (as train does on a NaN loss); counts
    calls."""
    import offroad_seg.training.loop as train_head

    calls: list[float] = []
    original = train_head.train

    def train(cfg, **kw):
        calls.append(cfg.lr)
        if cfg.lr == 2e-3:
            raise TrainingDiverged("training diverged: NaN loss at epoch 1", epoch=1)
        return original(cfg, **kw)

    monkeypatch.setattr(train_head, "train", train)
    return calls


def test_a_diverged_trial_is_recorded_as_failed_and_not_retried(diverging, caches, tmp_path):
    out = tmp_path / "nan"
    r = run(*sweep_args(caches, out, "--grid", "lr=1e-3,2e-3,3e-3"))
    assert r.exit_code == 0, r.output
    assert sorted(diverging) == [1e-3, 2e-3, 3e-3]
    assert "failed: " in r.stderr and "NaN loss at epoch 1" in r.stderr
    rows = leaderboard(out)
    assert [row["state"] for row in rows] == ["complete", "complete", "failed"]
    failed = rows[-1]
    assert failed["lr"] == "0.002" and failed["val_miou"] == ""
    assert failed["error"] == "training diverged: NaN loss at epoch 1"
    assert (out / "best").resolve() == (out / "trials" / rows[0]["run"]).resolve()
    assert "| failed |" in (out / "leaderboard.md").read_text()
    (trial,) = [t for t in study_trials(out) if t.state.name == "FAIL"]
    assert trial.user_attrs["error"] == failed["error"]
    assert trial.user_attrs["diverged_epoch"] == 1
    # a rerun finishes at once: the diverged trial is final
    r = run(*sweep_args(caches, out, "--grid", "lr=1e-3,2e-3,3e-3"))
    assert r.exit_code == 0, r.output
    assert "0 trials trained by this process" in r.stdout
    assert len(diverging) == 3
    assert leaderboard(out) == rows


def test_a_sweep_whose_every_trial_diverged_ends_without_a_best(diverging, caches, tmp_path):
    out = tmp_path / "all-nan"
    r = run(*sweep_args(caches, out, "--grid", "lr=2e-3"))
    assert r.exit_code == 0, r.output
    assert [row["state"] for row in leaderboard(out)] == ["failed"]
    assert not (out / "best").exists() and not (out / "best").is_symlink()
    assert "best val mIoU" not in r.stdout


def test_a_sweep_with_a_huge_lr_goes_on_end_to_end(caches, tmp_path):
    out = tmp_path / "huge-lr"
    # the loss of lr 1e6 is NaN by the third epoch (finite but 1e17 in the first)
    args = sweep_args(caches, out, "--grid", "lr=1e-3,1e6", "--epochs", "3")
    r = run(*args)
    assert r.exit_code == 0, r.output
    states = {row["lr"]: row["state"] for row in leaderboard(out)}
    assert states == {"0.001": "complete", "1e+06": "failed"}
    r = run(*args)
    assert r.exit_code == 0 and "0 trials trained by this process" in r.stdout, r.output


# ----------------------------------------------------------------------------- item 13


def _truncated(db: Path) -> None:
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 3])


def _random_bytes(db: Path) -> None:
    import random

    db.write_bytes(random.Random(0).randbytes(db.stat().st_size))


def _flipped_bytes(db: Path) -> None:
    data = bytearray(db.read_bytes())
    for offset in range(100, 140):  # the first page's b-tree header and cell pointers
        data[offset] ^= 0x5A
    db.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncated, _random_bytes, _flipped_bytes])
def test_a_damaged_study_db_is_one_line_and_overwrite_recovers(finished, caches, tmp_path, damage):
    out = copy_of(finished, tmp_path)
    damage(out / "study.db")
    r = run(*sweep_args(caches, out, *GRID))
    assert_one_line_error(r, str(out / "study.db"), "not a readable sweep database", "--overwrite")
    (out / "notes.txt").write_text("keep\n")
    r = run(*sweep_args(caches, out, *GRID, "--overwrite"))
    assert r.exit_code == 0, r.output
    assert leaderboard(out) == leaderboard(finished)
    assert (out / "notes.txt").read_text() == "keep\n"


def test_an_emptied_study_db_is_not_a_new_sweep(finished, caches, tmp_path):
    out = copy_of(finished, tmp_path)
    (out / "study.db").write_bytes(b"")
    r = run(*sweep_args(caches, out, *GRID))
    assert_one_line_error(r, str(out / "study.db"), "record is lost", "2 trial folders",
                          "--overwrite")  # fmt: skip
    assert (out / "study.db").stat().st_size == 0  # refused before sqlite wrote in it
    r = run(*sweep_args(caches, out, *GRID, "--overwrite"))
    assert r.exit_code == 0, r.output
    assert leaderboard(out) == leaderboard(finished)


def test_an_empty_study_db_of_a_sweep_killed_as_it_started_is_resumed(finished, caches, tmp_path):
    """sqlite creates the file before its first write: sweep.json, a 0-byte study.db and no
    trial folders is a sweep killed as it started, resumed."""
    out = tmp_path / "fresh"
    out.mkdir()
    shutil.copy(finished / "sweep.json", out / "sweep.json")
    (out / "study.db").write_bytes(b"")
    r = run(*sweep_args(caches, out, *GRID))
    assert r.exit_code == 0, r.output
    assert leaderboard(out) == leaderboard(finished)


def test_a_truncated_sweep_json_is_one_line_and_overwrite_recovers(finished, caches, tmp_path):
    out = copy_of(finished, tmp_path)
    path = out / "sweep.json"
    path.write_text(path.read_text()[:40])
    r = run(*sweep_args(caches, out, *GRID))
    assert_one_line_error(r, str(path), "unreadable", "--overwrite")
    r = run(*sweep_args(caches, out, *GRID, "--overwrite"))
    assert r.exit_code == 0, r.output
    assert leaderboard(out) == leaderboard(finished)


def test_a_truncated_sweep_json_without_a_study_is_not_proof_enough(caches, tmp_path):
    out = user_folder(tmp_path)
    (out / "sweep.json").write_text('{"caches": ["a"')
    before = snapshot(out)
    r = run(*sweep_args(caches, out, *GRID, "--overwrite"))
    assert_one_line_error(r, str(out / "sweep.json"), "unreadable", "no study records")
    assert snapshot(out) == before


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nosuchdb://x", "nosuchdb://x"),
        ("postgresql://127.0.0.1:9/x", "postgresql://127.0.0.1:9/x"),
        ("mysql://me:secret@127.0.0.1:9/x", "mysql://me:***@127.0.0.1:9/x"),
        ("not a url", "not a url"),
    ],
)
def test_a_bad_storage_url_is_one_line_and_writes_nothing(caches, tmp_path, url, shown):
    out = tmp_path / "remote"
    r = run(*sweep_args(caches, out, *GRID, "--storage", url))
    line = assert_one_line_error(r, f"--storage {shown}", "cannot open the study")
    assert "secret" not in line
    assert not out.exists()


# ----------------------------------------------------------------------------- item 11


def test_temporary_files_of_killed_writers_are_removed(finished, caches, tmp_path):
    out = copy_of(finished, tmp_path)
    host = socket.gethostname()
    dead = dead_pid()
    stale = [
        out / f".leaderboard.md.{host}-{dead}.0123abcd.tmp",
        out / f".leaderboard.csv.{dead}.0123abcd.tmp",  # the older name, without the host
        out / f".best.{host}-{dead}.0123abcd.tmp",
    ]
    for path in stale:
        path.write_text("partial")
    live = out / f".leaderboard.png.{host}-{os.getpid()}.0123abcd.tmp"
    live.write_text("being written")
    mine = out / ".my-notes.tmp"
    mine.write_text("user file")
    r = run(*sweep_args(caches, out, *GRID))
    assert r.exit_code == 0, r.output
    assert [p for p in stale if p.exists()] == []
    assert live.read_text() == "being written" and mine.read_text() == "user file"


def test_a_write_killed_midway_is_rolled_back_before_the_study_is_checked(tmp_path):
    # a sweep killed inside a database write leaves study.db-journal ("hot"); sqlite's
    # read-only check could not roll it back ("attempt to write a readonly database") and the
    # rerun was refused as if the database were damaged
    import sqlite3

    from offroad_seg.training.sweep.study import _check_sqlite

    db = tmp_path / "study.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t (x)")
    con.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(2000)])
    con.commit()
    con.close()
    killed_inside_a_write = (
        f"import os, signal, sqlite3; c = sqlite3.connect({str(db)!r}); "
        "c.execute('PRAGMA cache_size=1'); c.execute('UPDATE t SET x = x + 100000'); "
        "c.executemany('INSERT INTO t VALUES (?)', [(i,) for i in range(20000)]); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    subprocess.run([sys.executable, "-c", killed_inside_a_write], check=False)
    assert (tmp_path / "study.db-journal").stat().st_size > 0
    ro = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        ro.execute("SELECT count(*) FROM t").fetchall()
    ro.close()
    _check_sqlite(db)  # rolls the write back, then checks
    assert sqlite3.connect(db).execute("SELECT count(*), max(x) FROM t").fetchall() == [
        (2000, 1999)
    ]
