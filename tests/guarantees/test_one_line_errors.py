"""An error is ONE line on stderr, with nothing said before it (#27 item 7): missing backbone
weights (the reason the hub gave no download is part of that line, not a log line before it),
and a demo folder it may not use (refused before the demo's weights NOTE)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from offroad_seg.cli import cli
from tests.guarantees.test_bad_input import make_dataset


def test_missing_weights_is_one_line(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "d")
    unset = ("OFFROAD_SEG_WEIGHTS", "HF_HUB_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(
        TORCH_HOME=str(tmp_path / "torch"),  # no weights in any cache
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
        # the hub "behind" a proxy on a closed local port: refused at once, no network used
        HTTPS_PROXY="http://127.0.0.1:9",
        NO_PROXY="",
    )
    command = [sys.executable, "-m", "offroad_seg", "extract", str(data), str(tmp_path / "c.zarr"),
               "--size", "28x42", "--workers", "0"]  # fmt: skip
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: no dinov2_vits14 weights found (the Hugging Face hub is ")
    assert "not reachable: 127.0.0.1:9" in lines[0] and "pass --weights PATH" in lines[0]
    assert not (tmp_path / "c.zarr").exists()


def test_demo_refuses_a_foreign_folder_before_its_note(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    result = CliRunner().invoke(cli, ["demo", "--out", str(mine), "--weights", "random"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: {mine}: not empty and not a demo folder; pass another --out"
    ]
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]


def test_a_reader_that_goes_away_gets_no_error_line():
    # `offroad-seg backbones | head -2` used to end with "error: Broken pipe"
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "offroad_seg", "backbones"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before the table is written (as after `head`)
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert err == ""
