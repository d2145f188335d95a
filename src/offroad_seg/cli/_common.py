"""What every command module shares: the `offroad-seg` click group and its logging (-v/-q,
also accepted after a command), the `stage` wrapper that turns an error into one line and an
exit status, and the option types the commands' options use.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import click
from tqdm.auto import tqdm

from offroad_seg import __version__
from offroad_seg.errors import Interrupted, OffroadSegError

log = logging.getLogger("offroad_seg")


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def is_main_rank() -> bool:
    """False on the non-zero ranks of a torchrun launch: they work quietly."""
    return int(os.environ.get("RANK", "0")) == 0


def _setup_logging(verbose: int, quiet: bool) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("offroad_seg")
    root.handlers[:] = [handler]
    root.propagate = False
    _set_level(logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO))


def _set_level(level: int) -> None:
    if not is_main_rank():
        level = max(level, logging.WARNING)
    logging.getLogger("offroad_seg").setLevel(level)


def fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def stage(fn):
    """Run a command body, turning user-facing errors into one line and an exit status."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OffroadSegError as e:
            code = 130 if isinstance(e, Interrupted) else 1
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__, code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except BrokenPipeError:
            # the reader went away (`offroad-seg backbones | head`): nothing to say, and the
            # interpreter's final flush of stdout must not fail again (Python's own advice)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except OSError as e:
            # Disk full, permission denied, ...: name the file when the OS does.
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            fail(f"{where}{e.strerror or e}")

    return wrapper


def paths_then_out(name: str, **kwargs):
    """Arguments NAME... (caches, inputs) then OUT. Given one path, click would fill OUT with
    it and report 'Missing argument CACHES...', though OUT is what was forgotten: the check
    runs on OUT (processed last) and names what is missing, with the command's usage."""
    metavar = f"{name.upper()}..."

    def check(ctx: click.Context, param: click.Parameter, out: Path | None) -> Path:
        if out is None or not ctx.params.get(name):
            usage = " ".join(ctx.command.collect_usage_pieces(ctx)[1:])  # without [OPTIONS]
            missing = f"{metavar} and OUT" if out is None else "OUT"
            raise click.UsageError(f"missing {missing}: {ctx.info_name} {usage}", ctx)
        return out

    def decorate(fn):
        fn = click.argument(
            "out", required=False, metavar="OUT", callback=check, type=click.Path(path_type=Path)
        )(fn)
        return click.argument(name, nargs=-1, required=False, metavar=metavar, **kwargs)(fn)

    return decorate


class LazyChoice(click.Choice):
    """A choice whose values come from a registry loaded on first use (the head registry
    imports torch, which `offroad-seg --help` should not pay for)."""

    def __init__(self, load) -> None:
        self._load = load
        self.case_sensitive = True

    @property
    def choices(self):
        return tuple(self._load())


class LossSpecType(click.ParamType):
    """A loss spec such as ce+0.5dice, checked against the loss registry when given."""

    name = "SPEC"

    def convert(self, value, param, ctx):
        from offroad_seg.errors import ConfigError
        from offroad_seg.training.losses import LossSpec

        try:
            return str(LossSpec.parse(str(value)))
        except ConfigError as e:
            self.fail(str(e), param, ctx)


class ScalesType(click.ParamType):
    """Comma-separated positive numbers: 0.75,1,1.25."""

    name = "S1,S2,..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            scales = tuple(float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r}: expected comma-separated numbers, e.g. 0.75,1,1.25", param, ctx)
        if not all(s > 0 for s in scales):
            self.fail(f"{value!r}: scales must be positive", param, ctx)
        return scales


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="offroad-seg")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose: int, quiet: bool) -> None:
    """Off-road scene segmentation on a frozen DINOv2 backbone.

    \b
    Typical use:
      offroad-seg extract data/train cache/train.zarr      # backbone once, features cached
      offroad-seg extract data/val cache/val.zarr
      offroad-seg train cache/train.zarr runs/h1 --val-cache cache/val.zarr
      offroad-seg evaluate runs/h1/segmentation_head.pth data/val runs/h1/val
    """
    _setup_logging(verbose, quiet)


def accept_verbosity_everywhere(group: click.Group) -> None:
    """-v/-q are accepted after the command too (`offroad-seg evaluate ... -q`), not only
    before it."""

    def verbose(ctx, param, value):
        if value:
            _set_level(logging.DEBUG)

    def quiet(ctx, param, value):
        if value:
            _set_level(logging.WARNING)

    for command in group.commands.values():
        if isinstance(command, click.Group):
            accept_verbosity_everywhere(command)
            continue
        command.params += [
            click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=verbose,
                         help="More log output."),
            click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=quiet,
                         help="Only warnings and errors."),
        ]  # fmt: skip
