"""Commands that describe results: `info` (what a head or run is) and `compare` (runs side by
side).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from offroad_seg.cli._common import cli, stage


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--markdown", is_flag=True, help="A markdown table.")
@click.option(
    "--plot",
    type=click.Path(path_type=Path),
    help="Also write a PNG of the runs' per-class IoU.",
)
@stage
def compare(runs: tuple[Path, ...], markdown: bool, plot: Path | None) -> None:
    """Compare runs (folders or head checkpoints): the settings that differ, and their
    validation metrics and per-class IoU side by side."""
    from offroad_seg.reporting.compare import comparison_table, run_labels, summarize

    summaries = [summarize(r) for r in runs]
    click.echo(comparison_table(summaries, markdown=markdown))
    if plot is not None:
        from offroad_seg.reporting.plots import plot_class_iou_comparison

        plot_class_iou_comparison(
            {label: s.class_iou for label, s in zip(run_labels(summaries), summaries, strict=True)},
            plot,
            title="Per-class IoU (validation)",
        )
        click.echo(f"plot: {plot}")


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@stage
def info(path: Path, as_json: bool) -> None:
    """What a head checkpoint (or run folder) is: backbone, head, settings, best metrics."""
    from offroad_seg.reporting.info import head_info, head_info_text

    summary = head_info(path)
    click.echo(json.dumps(summary, indent=2) if as_json else head_info_text(summary))
