"""A sweep shared through a real PostgreSQL server (issue #26 item 3): two sweep processes,
each with its own folder as on two machines, share one study; one is killed with SIGKILL in
the middle of a trial; the other and a rerun finish every trial exactly once. A trial whose
machine died (its heartbeat stale) is retried by a process of another machine; a live one
is left alone.

The server is a throwaway cluster (Debian's `postgresql` package: initdb, pg_ctl) in a
temporary folder, reached only through a unix socket there; as root it runs as the
`postgres` (or `nobody`) user, since PostgreSQL refuses to run as root. Without the package
the tests skip, except in CI (`CI` set), where .ci/run installs it and they must run."""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from offroad_seg.cli import cli

STUDY = "offroad-seg-sweep"
TRIALS = 3
SEARCH = ["--range", "lr=1e-4:1e-3:log", "--trials", str(TRIALS)]
FAST = ["--head", "linear", "--epochs", "1", "--device", "cpu"]


def _server_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                      key=lambda p: int(Path(p).parts[-3]))  # fmt: skip
    return versions[-1] if versions else None


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the PostgreSQL sweep tests (.ci/run installs it)")
    pytest.skip(f"{reason} (install Debian's postgresql package to run this test)")


def _server_user() -> list[str]:
    """The command prefix that runs the server's tools as a user PostgreSQL accepts: none
    unless we are root, which it refuses."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        _unavailable("running as root and no runuser to start PostgreSQL as another user")
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return [runuser, "-u", name, "--"]
    _unavailable("running as root and no postgres or nobody user to run PostgreSQL as")
    return []


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster: yields a function that creates a database and returns
    its URL. Stopped (only this cluster, by its data folder) and deleted afterwards."""
    initdb, pg_ctl = _server_binary("initdb"), _server_binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        _unavailable("PostgreSQL server not installed: no initdb/pg_ctl")
    try:
        import psycopg
    except ImportError:
        _unavailable("no psycopg (pip install 'offroad-seg[postgres]')")
    as_user = _server_user()
    root = Path(tempfile.mkdtemp(prefix="offroad-pg-", dir="/tmp"))  # short: a socket path
    if as_user:
        shutil.chown(root, user=as_user[2])
    data, logfile = root / "data", root / "server.log"
    options = f"-c listen_addresses='' -k {root} -c fsync=off -c full_page_writes=off"

    def tool(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=60)

    try:
        made = tool(initdb, "-D", str(data), "-U", "offroad", "--auth=trust", "-E", "UTF8",
                    "--no-sync")  # fmt: skip
        assert made.returncode == 0, made.stderr
        started = tool(pg_ctl, "-D", str(data), "-l", str(logfile), "-o", options, "-w",
                       "-t", "30", "start")  # fmt: skip
        assert started.returncode == 0, started.stdout + started.stderr + logfile.read_text()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise

    def database(name: str) -> str:
        with psycopg.connect(host=str(root), user="offroad", dbname="postgres",
                             autocommit=True) as con:  # fmt: skip
            con.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://offroad@/{name}?host={root}"

    try:
        yield database
    finally:
        tool(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def sweep_args(caches, out, url, *extra) -> list[str]:
    return ["sweep", str(caches["train"]), str(out), "--val-cache", str(caches["val"]), *FAST,
            *SEARCH, "--storage", url, *extra]  # fmt: skip


def trials_of(url: str):
    import optuna

    return optuna.load_study(study_name=STUDY, storage=url).get_trials()


def leaderboard_runs(out: Path) -> list[str]:
    if not (out / "leaderboard.csv").is_file():
        return []
    with open(out / "leaderboard.csv") as f:
        return [row["run"] for row in csv.DictReader(f)]


def finished_runs(out: Path) -> set[str]:
    """The trial folders under `out` holding a finished run (history.json marked finished)."""
    found = set()
    for history in (out / "trials").glob("*/train_stats/history.json"):
        if json.loads(history.read_text()).get("finished"):
            found.add(history.parent.parent.name)
    return found


def wait_for_running_trial(url: str, pid: int, proc: subprocess.Popen) -> int:
    """The number of a trial that process `pid` is training (RUNNING, its folder named)."""
    from optuna.trial import TrialState

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(Exception):  # the study may not exist yet
            for t in trials_of(url):
                if t.state == TrialState.RUNNING and t.user_attrs.get("pid") == pid and \
                        "run" in t.user_attrs:  # fmt: skip
                    return t.number
        time.sleep(0.02)
    pytest.fail(f"process {pid} never ran a trial (exit {proc.poll()})")


def test_two_machines_and_a_rerun_finish_every_trial_once_after_a_kill(postgres, caches, tmp_path):
    from optuna.trial import TrialState

    url = postgres("killed")
    a, b = tmp_path / "node-a", tmp_path / "node-b"  # one folder per "machine"
    command = [sys.executable, "-m", "offroad_seg"]
    proc_a = subprocess.Popen([*command, *sweep_args(caches, a, url)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    proc_b = subprocess.Popen([*command, *sweep_args(caches, b, url)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        killed = wait_for_running_trial(url, proc_a.pid, proc_a)
        os.kill(proc_a.pid, signal.SIGKILL)
        proc_a.wait()
        stdout, err = proc_b.communicate(timeout=300)
    finally:
        for proc in (proc_a, proc_b):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc_b.returncode == 0, err
    trained_b = int(re.search(r"(\d+) trials? trained by this process", stdout)[1])
    rerun = CliRunner().invoke(cli, sweep_args(caches, a, url))
    assert rerun.exit_code == 0, rerun.output
    trained_rerun = int(re.search(r"(\d+) trials? trained by this process", rerun.output)[1])

    trials = trials_of(url)
    by_number = {t.number: t for t in trials}
    assert by_number[killed].state == TrialState.FAIL, "the kill did not land mid-trial"
    assert by_number[killed].user_attrs.get("interrupted") is True
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    # every sample exactly once: none lost, none trained twice
    assert sorted(t.user_attrs["sample"] for t in complete) == list(range(TRIALS))
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for t in trials:  # the other trials that did not complete: spare asks or the killed one
        if t.state == TrialState.FAIL:
            assert t.user_attrs.get("spare") or t.user_attrs.get("interrupted"), t.user_attrs
    retry = [t for t in complete if t.user_attrs.get("retry_of") == killed]
    assert len(retry) == 1  # the killed trial's settings ran again, once
    assert retry[0].params == by_number[killed].params
    assert retry[0].user_attrs["sample"] == by_number[killed].user_attrs["sample"]

    # the trained counts add up: A before its kill, B, the rerun
    trained_a = sum(1 for t in complete if t.user_attrs["pid"] == proc_a.pid)
    assert trained_a + trained_b + trained_rerun == TRIALS
    # each completed trial's finished run is in exactly one machine's folder, and each
    # folder's leaderboard lists exactly its own finished runs
    runs = {t.user_attrs["run"] for t in complete}
    assert len(runs) == TRIALS
    done_a, done_b = finished_runs(a), finished_runs(b)
    assert not done_a & done_b and done_a | done_b == runs
    assert sorted(leaderboard_runs(a)) == sorted(done_a)
    assert sorted(leaderboard_runs(b)) == sorted(done_b)


def test_a_stale_trial_of_another_machine_is_retried_and_a_live_one_is_not(
    postgres, caches, tmp_path
):
    """A RUNNING trial whose heartbeat is older than stale_after_s (its machine died) is
    failed and retried with its settings; one whose heartbeat is fresh (its machine still
    trains it) is left to its machine."""
    import optuna
    import psycopg
    from optuna.trial import TrialState

    from offroad_seg.config import SweepConfig, TrainConfig
    from offroad_seg.training.sweep.run import sweep
    from offroad_seg.training.sweep.study import STUDY_NAME

    url = postgres("stale")
    lost, live = 0.00031, 0.00047  # the two other machines' trials' lr
    train = TrainConfig(caches=(caches["train"],), val_cache=caches["val"],
                        out=tmp_path / "node-c", head="linear", epochs=1, device="cpu",
                        progress=False)  # fmt: skip
    cfg = SweepConfig(
        train=train,
        grid=(f"lr={lost},{live},2e-4",),
        storage=url,
        heartbeat_s=1,
        stale_after_s=60,
    )
    storage = optuna.storages.RDBStorage(f"postgresql+psycopg{url[len('postgresql') :]}")
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="maximize")
    grid = optuna.distributions.CategoricalDistribution([lost, live, 2e-4])
    taken = {}
    for lr in (lost, live):  # taken by processes of other machines
        study.enqueue_trial({"lr": lr}, user_attrs={"queued": True})
        trial = study.ask()
        trial.suggest_categorical("lr", grid.choices)
        trial.set_user_attr("host", "node-elsewhere")
        trial.set_user_attr("pid", 1)
        storage.record_heartbeat(trial._trial_id)
        taken[lr] = trial._trial_id
    study.enqueue_trial({"lr": 2e-4}, user_attrs={"queued": True})
    host = url.split("host=")[1]
    with psycopg.connect(host=host, user="offroad", dbname="stale", autocommit=True) as con:
        con.execute(  # the lost machine's last heartbeat, two minutes ago
            "UPDATE trial_heartbeats SET heartbeat = heartbeat - interval '120 seconds' "
            "WHERE trial_id = %s",
            (taken[lost],),
        )
    result = sweep(cfg)
    assert result.trained == 2  # the lost machine's trial again, and the one left

    trials = optuna.load_study(study_name=STUDY_NAME, storage=url).get_trials()
    states = {(t.params["lr"], t.state) for t in trials}
    assert states == {
        (lost, TrialState.FAIL),  # failed as dead ...
        (lost, TrialState.COMPLETE),  # ... and retried here
        (live, TrialState.RUNNING),  # still its machine's
        (2e-4, TrialState.COMPLETE),
    }
    failed = next(t for t in trials if t.state == TrialState.FAIL)
    assert failed.user_attrs["interrupted"] is True
    retry = next(t for t in trials if t.params["lr"] == lost and t.state == TrialState.COMPLETE)
    assert retry.user_attrs["retry_of"] == failed.number


def test_a_postgresql_url_without_a_driver_uses_the_installed_psycopg(monkeypatch):
    """`postgresql://` loads psycopg2 on SQLAlchemy 2.0: the postgres extra's psycopg 3 is
    named instead when psycopg2 is missing; a URL naming its driver is kept."""
    import importlib.util

    from offroad_seg.training.sweep import study

    installed = {"psycopg"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: name in installed or None)
    assert study._with_installed_driver("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert study._with_installed_driver("postgresql+pg8000://u@h/db") == (
        "postgresql+pg8000://u@h/db"
    )
    assert study._with_installed_driver("sqlite:///x.db") == "sqlite:///x.db"
    installed.add("psycopg2")  # the user's own choice stays
    assert study._with_installed_driver("postgresql://u@h/db") == "postgresql://u@h/db"


def test_a_missing_database_driver_is_one_line_saying_what_to_install(
    caches, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # not installed, even where it is
    out = tmp_path / "sweep"
    args = ["sweep", str(caches["train"]), str(out), "--val-cache", str(caches["val"]), *FAST,
            *SEARCH, "--storage", "postgresql+psycopg2://me:secret@db.invalid/x"]  # fmt: skip
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and not out.exists()
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "pip install 'offroad-seg[postgres]'" in lines[0], r.stderr
    assert "psycopg2" in lines[0] and "secret" not in lines[0]
