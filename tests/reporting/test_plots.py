"""Tests of the figures and image panels in offroad_seg.reporting.plots."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from offroad_seg.data.classes import ClassMap
from offroad_seg.reporting import overlays, plots

CLASS_MAP = ClassMap.default()
K = CLASS_MAP.num_classes


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()
        return img.size


def _only_file(folder: Path, name: str) -> None:
    """`folder` holds exactly `name`: no temporary file was left behind."""
    assert sorted(p.name for p in folder.iterdir()) == [name]


@pytest.fixture
def strict_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _history(with_val: bool) -> list[dict[str, float | None]]:
    rows: list[dict[str, float | None]] = []
    for epoch in range(1, 9):
        row: dict[str, float | None] = {"epoch": epoch, "train_loss": 2.0 / epoch}
        if with_val and epoch % 2 == 0:
            row.update(
                val_loss=2.5 / epoch,
                val_miou=0.1 * epoch,
                val_dice=0.11 * epoch,
                val_pixel_acc=0.5 + 0.05 * epoch,
            )
        elif with_val:
            row.update(val_loss=None, val_miou=None, val_dice=None, val_pixel_acc=None)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- matplotlib figures


@pytest.mark.parametrize("with_val", [True, False])
def test_training_curves_png(tmp_path: Path, with_val: bool, strict_warnings) -> None:
    path = tmp_path / "curves.png"
    plots.plot_training_curves(_history(with_val), path)
    assert _png_size(path) == (1100, 770)  # 10 x 7 inches at 110 dpi
    _only_file(tmp_path, "curves.png")


def test_training_curves_are_titled_with_the_run_and_panels_with_their_metric() -> None:
    """The figure's title is the run's name (it was the last panel's, "Validation pixel
    accuracy", whatever the run); each panel keeps its own."""
    fig = plots.training_curves_figure(_history(True), title="runs/h1")
    assert fig._suptitle.get_text() == "runs/h1"
    titles = [ax.get_title().split(" (best")[0] for ax in fig.axes]
    assert titles == [
        "Loss",
        "Validation mIoU",
        "Validation mean Dice",
        "Validation pixel accuracy",
    ]
    assert plots.training_curves_figure(_history(True))._suptitle is None


def test_training_curves_odd_histories(tmp_path: Path, strict_warnings) -> None:
    plots.plot_training_curves([], tmp_path / "empty.png")
    plots.plot_training_curves([{"epoch": 1, "train_loss": 0.7}], tmp_path / "one.png")
    plots.plot_training_curves(
        [{"train_loss": float("nan"), "val_miou": 0.3}, {"val_miou": float("inf")}],
        tmp_path / "nan.png",
    )
    for name in ("empty.png", "one.png", "nan.png"):
        assert _png_size(tmp_path / name) == (1100, 770)


def test_per_class_metrics_png(tmp_path: Path, strict_warnings) -> None:
    iou = np.linspace(0.1, 0.9, K)
    iou[3] = np.nan
    dice = 2 * iou / (1 + iou)
    path = tmp_path / "sub" / "per_class.png"  # the folder is created
    plots.plot_per_class_metrics(CLASS_MAP.names, iou, dice, path, title="val")
    # 8 inches wide; 0.5 inch per class + 1.5 tall, at 110 dpi.
    assert _png_size(path) == (880, round((0.5 * K + 1.5) * 110))
    _only_file(path.parent, "per_class.png")


def test_per_class_metrics_all_nan_and_bad_lengths(tmp_path: Path, strict_warnings) -> None:
    nan = np.full(3, np.nan)
    plots.plot_per_class_metrics(["a", "b", "c"], nan, nan, tmp_path / "nan.png")
    assert _png_size(tmp_path / "nan.png") == (880, 330)  # the 3-inch minimum height
    with pytest.raises(ValueError, match="3 names"):
        plots.plot_per_class_metrics(["a", "b", "c"], np.zeros(2), np.zeros(3), tmp_path / "x")
    with pytest.raises(ValueError, match="no classes"):
        plots.plot_per_class_metrics([], np.zeros(0), np.zeros(0), tmp_path / "x")


@pytest.mark.parametrize("normalize", [True, False])
def test_confusion_matrix_zero_row_does_not_warn(
    tmp_path: Path, normalize: bool, strict_warnings
) -> None:
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 1000, size=(K, K)).astype(np.int64)
    cm[np.arange(K), np.arange(K)] += 5_000_000
    cm[4] = 0  # a class with no ground-truth pixels
    cm[:, 5] = 0  # and one never predicted
    path = tmp_path / "cm.png"
    plots.plot_confusion_matrix(cm, CLASS_MAP.names, path, normalize=normalize)
    side = 0.62 * K + 3.0
    assert _png_size(path) == (round((side + 1.2) * 110), round(side * 110))
    _only_file(tmp_path, "cm.png")


def test_confusion_matrix_all_zero_and_bad_shape(tmp_path: Path, strict_warnings) -> None:
    plots.plot_confusion_matrix(np.zeros((2, 2)), ["a", "b"], tmp_path / "zero.png")
    assert _png_size(tmp_path / "zero.png") == (round(6.2 * 110), round(5.0 * 110))
    with pytest.raises(ValueError, match="3 names"):
        plots.plot_confusion_matrix(np.zeros((2, 2)), ["a", "b", "c"], tmp_path / "x.png")


# --------------------------------------------------------------------------- image panels


def _inputs(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    truth = rng.integers(0, K, size=(h, w)).astype(np.uint8)
    truth[0, 0] = 255  # an ignored pixel shows white
    pred = rng.integers(0, K, size=(h, w)).astype(np.uint8)
    return image, CLASS_MAP.colorize(truth), CLASS_MAP.colorize(pred)


@pytest.mark.parametrize("title", [None, "frame_0001.png  mIoU 0.512"])
@pytest.mark.parametrize(("h", "w"), [(540, 960), (40, 60), (1, 1), (7, 300)])
def test_comparison_panel_layout(h: int, w: int, title: str | None) -> None:
    image, truth, pred = _inputs(h, w)
    panel = overlays.comparison_panel(image, truth, pred, CLASS_MAP, title=title)
    layout = overlays.panel_layout(image.shape, CLASS_MAP, title)

    assert panel.dtype == np.uint8
    assert layout.header > 0 and layout.legend > 0
    assert panel.shape == (layout.header + h + layout.legend, 3 * w, 3)
    assert (layout.height, layout.width) == panel.shape[:2]
    top = layout.header
    np.testing.assert_array_equal(panel[top : top + h, 0:w], image)
    np.testing.assert_array_equal(panel[top : top + h, w : 2 * w], truth)
    np.testing.assert_array_equal(panel[top : top + h, 2 * w : 3 * w], pred)

    if w >= 60:  # narrower panels clip their text
        # Every class colour appears in the legend strip.
        legend = panel[top + h :].reshape(-1, 3)
        colours = {tuple(int(v) for v in px) for px in np.unique(legend, axis=0)}
        for colour in CLASS_MAP.palette:
            assert tuple(int(v) for v in colour) in colours
        # The caption bar holds text: more colours than its background (and the title's).
        assert len(np.unique(panel[:top].reshape(-1, 3), axis=0)) > 3


def test_comparison_panel_header_and_legend_sizes() -> None:
    big = overlays.panel_layout((540, 960, 3), CLASS_MAP)
    big_titled = overlays.panel_layout((540, 960, 3), CLASS_MAP, "title")
    small = overlays.panel_layout((40, 60, 3), CLASS_MAP)
    assert big_titled.header == 2 * big.header  # the title bar is as tall as the captions
    assert big.header > small.header  # text scales with the image width
    assert small.legend > big.legend  # a narrow panel wraps the legend over more rows
    assert overlays.panel_layout((540, 960, 3), CLASS_MAP, "") == big


def test_comparison_panel_is_deterministic_and_leaves_inputs_alone() -> None:
    image, truth, pred = _inputs(30, 50, seed=3)
    copies = [a.copy() for a in (image, truth, pred)]
    first = overlays.comparison_panel(image, truth, pred, CLASS_MAP, title="t")
    second = overlays.comparison_panel(image, truth, pred, CLASS_MAP, title="t")
    np.testing.assert_array_equal(first, second)
    assert first.flags.writeable
    for a, b in zip((image, truth, pred), copies, strict=True):
        np.testing.assert_array_equal(a, b)


def test_comparison_panel_rejects_mismatched_inputs() -> None:
    image, truth, pred = _inputs(20, 30)
    with pytest.raises(ValueError, match="differ in size"):
        overlays.comparison_panel(image, truth[:10], pred, CLASS_MAP)
    with pytest.raises(ValueError, match="uint8"):
        overlays.comparison_panel(image.astype(np.float32), truth, pred, CLASS_MAP)
    with pytest.raises(ValueError, match="uint8"):
        overlays.comparison_panel(image[..., 0], truth, pred, CLASS_MAP)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_overlay_blend(alpha: float) -> None:
    image, _, pred = _inputs(33, 47, seed=1)
    out = overlays.overlay(image, pred, alpha)
    expected = np.rint(
        (1.0 - alpha) * image.astype(np.float64) + alpha * pred.astype(np.float64)
    ).astype(np.uint8)
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out, expected)
    if alpha == 0.0:
        np.testing.assert_array_equal(out, image)
    if alpha == 1.0:
        np.testing.assert_array_equal(out, pred)


def test_overlay_known_values() -> None:
    image = np.array([[[0, 100, 255]]], dtype=np.uint8)
    pred = np.array([[[255, 0, 255]]], dtype=np.uint8)
    np.testing.assert_array_equal(overlays.overlay(image, pred, 0.5), [[[128, 50, 255]]])
    np.testing.assert_array_equal(overlays.overlay(image, pred, 0.25), [[[64, 75, 255]]])


def test_overlay_rejects_bad_input() -> None:
    image, _, pred = _inputs(10, 10)
    with pytest.raises(ValueError, match="alpha"):
        overlays.overlay(image, pred, 1.5)
    with pytest.raises(ValueError, match="differ"):
        overlays.overlay(image, pred[:5])


@pytest.mark.parametrize(("h", "w"), [(540, 960), (33, 47), (1, 1)])
def test_overlay_with_legend(h: int, w: int) -> None:
    image, _, pred = _inputs(h, w, seed=4)
    out = overlays.overlay_with_legend(image, pred, CLASS_MAP, alpha=0.3)
    assert out.dtype == np.uint8 and out.shape[1:] == (w, 3) and out.shape[0] > h
    np.testing.assert_array_equal(out[:h], overlays.overlay(image, pred, 0.3))

    # The legend does not depend on the image: another image of that size gets the same one.
    other, _, other_pred = _inputs(h, w, seed=5)
    again = overlays.overlay_with_legend(other, other_pred, CLASS_MAP)
    assert again.shape == out.shape
    np.testing.assert_array_equal(again[h:], out[h:])
    if w >= 60:  # every class colour appears in the legend
        colours = {tuple(int(v) for v in px) for px in np.unique(out[h:].reshape(-1, 3), axis=0)}
        for colour in CLASS_MAP.palette:
            assert tuple(int(v) for v in colour) in colours
    # wrapped to the narrower width: taller than the legend of a 3-column comparison panel
    if w == 960:
        assert out.shape[0] - h > overlays.panel_layout(image.shape, CLASS_MAP).legend


def test_overlay_with_legend_rejects_bad_input() -> None:
    image, _, pred = _inputs(10, 10)
    with pytest.raises(ValueError, match="differ"):
        overlays.overlay_with_legend(image, pred[:5], CLASS_MAP)
    with pytest.raises(ValueError, match="alpha"):
        overlays.overlay_with_legend(image, pred, CLASS_MAP, alpha=-0.1)


# --------------------------------------------------------------------------- save_png


def test_save_png_round_trip_and_no_temp_files(tmp_path: Path) -> None:
    image, _, _ = _inputs(21, 34, seed=2)
    path = tmp_path / "out" / "panel.png"
    plots.save_png(path, image)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img), image)
    plots.save_png(path, image[::-1].copy())  # overwrite in place
    with Image.open(path) as img:
        np.testing.assert_array_equal(np.asarray(img), image[::-1])
    _only_file(path.parent, "panel.png")


def test_save_png_uses_normal_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        plots.save_png(tmp_path / "a.png", np.zeros((2, 2, 3), dtype=np.uint8))
    finally:
        os.umask(old)
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o644


def test_save_png_failure_keeps_old_file_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "panel.png"
    plots.save_png(path, np.full((4, 4, 3), 7, dtype=np.uint8))
    before = path.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        plots.save_png(path, np.zeros((4, 4, 3), dtype=np.uint8))
    assert path.read_bytes() == before
    _only_file(tmp_path, "panel.png")


def test_save_png_rejects_bad_arrays(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        plots.save_png(tmp_path / "x.png", np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        plots.save_png(tmp_path / "x.png", np.zeros((4, 4, 4), dtype=np.uint8))
    assert list(tmp_path.iterdir()) == []


def _swatches(strip: np.ndarray, rows: list | None = None) -> list[tuple[int, int, int]]:
    """The legend's swatches, in reading order: the fill colour inside each outlined square
    (top-left corners of runs of the outline colour going right and down); their tops are
    appended to `rows`."""
    edge = (strip == overlays._SWATCH_OUTLINE).all(axis=-1)
    found = []
    for y, x in zip(*np.nonzero(edge), strict=True):
        if (x and edge[y, x - 1]) or (y and edge[y - 1, x]):
            continue
        if edge[y, x : x + 6].all() and edge[y : y + 6, x].all():
            found.append(tuple(int(v) for v in strip[y + 3, x + 3]))
            if rows is not None:
                rows.append(int(y))
    return found


def test_legends_show_ignore_only_beside_a_truth_that_has_it() -> None:
    # #27 item 15: a prediction never holds the ignore id: no swatch for it on an overlay
    # (at 960 px it took a third legend row); a comparison panel shows it when asked
    classes = [tuple(int(v) for v in c) for c in CLASS_MAP.palette]
    image, truth, pred = _inputs(540, 960, seed=6)
    out = overlays.overlay_with_legend(image, pred, CLASS_MAP)
    tops: list[int] = []
    assert _swatches(out[540:], tops) == classes
    assert len(set(tops)) == 2  # two rows of entries at 960 px, where ignore made three
    assert [name for name, _ in overlays.legend_entries(CLASS_MAP)] == CLASS_MAP.names
    for ignore, expected in ((True, [*classes, (255, 255, 255)]), (False, classes)):
        panel = overlays.comparison_panel(image, truth, pred, CLASS_MAP, ignore=ignore)
        layout = overlays.panel_layout(image.shape, CLASS_MAP, ignore=ignore)
        assert panel.shape[0] == layout.height
        assert _swatches(panel[layout.header + 540 :]) == expected
