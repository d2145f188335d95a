"""compare's labels and plot: runs that share a folder name stay apart."""

from __future__ import annotations

from pathlib import Path

from offroad_seg.reporting.compare import RunSummary, comparison_table, run_labels
from offroad_seg.reporting.plots import plot_class_iou_comparison


def summary(path: str, miou: float) -> RunSummary:
    return RunSummary(Path(path).parent.name, Path(path), {"lr": miou}, {"val mIoU": miou}, {})


def test_runs_are_labelled_by_the_shortest_distinct_tail_of_their_path():
    runs = [
        summary("runs/sweep1/best/segmentation_head.pth", 0.5),
        summary("runs/sweep2/best/segmentation_head.pth", 0.6),
        summary("heads/h1.pth", 0.7),
    ]
    assert run_labels(runs) == ["sweep1/best", "sweep2/best", "h1"]
    assert run_labels([*runs[2:], summary("other/h2.pth", 0.1)]) == ["h1", "h2"]
    table = comparison_table(runs[:2], markdown=True)
    assert table.splitlines()[0] == "| | sweep1/best | sweep2/best |"


def test_the_plot_has_a_bar_group_per_run_and_its_legend_beside_the_bars(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    saved: list[Figure] = []
    monkeypatch.setattr(
        "offroad_seg.reporting.plots._save_figure", lambda fig, path: saved.append(fig)
    )
    ious = {"a/best": {"Sky": 0.9, "Trees": 0.4}, "b/best": {"Sky": 0.8, "Trees": 0.5}}
    plot_class_iou_comparison(ious, tmp_path / "c.png")
    (fig,) = saved
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a/best", "b/best"]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    legend, axes = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.x0 >= axes.x1  # right of the plotting area: it covers no bar
