"""The `offroad-seg` command line: thin wrappers that turn options into one stage call.

Errors caused by input (`OffroadSegError`) end with one line on stderr and exit status 1;
Ctrl-C exits 130 after the stage has left its outputs resumable.

The group and what every command shares are in `_common.py`; the commands, one module per
family: `data.py` (synth, demo, backbones), `features.py` (extract, cache), `training.py`
(train, sweep), `inference.py` (evaluate, predict, export), `reporting.py` (info, compare).
Importing this package registers them all (`offroad-seg --help` lists them by name).
"""

from __future__ import annotations

from offroad_seg.cli import data, features, inference, reporting, training
from offroad_seg.cli._common import accept_verbosity_everywhere, cli, stage

__all__ = ["cli", "data", "features", "inference", "main", "reporting", "stage", "training"]

accept_verbosity_everywhere(cli)  # after every command is registered


def main() -> None:
    cli(prog_name="offroad-seg")


if __name__ == "__main__":
    main()
