"""Tests of the HTML evaluation report (reporting.report), down to how Chromium renders it."""

from __future__ import annotations

import base64
import io
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from offroad_seg.data.classes import IGNORE_ID, ClassMap
from offroad_seg.metrics.confusion import SegMetrics, confusion_matrix
from offroad_seg.metrics.hackathon import HACKATHON_TITLE, HackathonMetrics
from offroad_seg.reporting import overlays, plots
from offroad_seg.reporting.report import ImageRow, write_report
from offroad_seg.reporting.thumbnails import THUMBNAIL_HEIGHT, make_thumbnail, save_thumbnail

CLASS_MAP = ClassMap.default()
K = CLASS_MAP.num_classes
H, W = 60, 100  # small synthetic images: 96 x 160 thumbnail panels
N_IMAGES = 5
ABSENT = 6  # Flowers: in no truth and no prediction of the report's images
SETTINGS = {
    "head": "runs/h1/segmentation_head.pth",
    "data": "data/val <& 'quoted'>",  # escaped, never markup
    "backbone": "dinov2_vits14",
    "TTA": "flip",
    "date": "2025-01-01 12:00",
}
BANNER = "UNTRAINED BACKBONE: <random> weights"  # escaped, never markup
HACKATHON = HackathonMetrics(
    miou=0.4321,
    dice=0.5678,
    pixel_accuracy=0.8765,
    num_batches=3,
    num_images=5,
    class_iou=(0.61, float("nan"), 0.2468),
    class_names=("Background", "Trees", "Sky"),
)


# --------------------------------------------------------------------------- references


def _reference_iou(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per-class IoU straight from the pixels (NaN where a class is in neither)."""
    valid = truth != IGNORE_ID
    out = np.full(K, np.nan)
    for c in range(K):
        t, p = (truth == c) & valid, (pred == c) & valid
        union = int((t | p).sum())
        if union:
            out[c] = int((t & p).sum()) / union
    return out


def _sample_at_centres(ids: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest sampling at pixel centres, written out with loops."""
    big_h, big_w = ids.shape
    out = np.empty((height, width), dtype=ids.dtype)
    for y in range(height):
        for x in range(width):
            out[y, x] = ids[int((y + 0.5) * big_h / height), int((x + 0.5) * big_w / width)]
    return out


def _scene(seed: int, error_rate: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image, a truth of class blocks (some ignore) and a prediction with errors; never
    the class ABSENT."""
    rng = np.random.default_rng(seed)
    classes = np.array([c for c in range(K) if c != ABSENT], dtype=np.uint8)
    truth = rng.choice(classes, size=(6, 10)).repeat(10, axis=0).repeat(10, axis=1)
    truth[:4, :8] = IGNORE_ID
    pred = truth.copy()
    wrong = rng.random((H, W)) < error_rate
    pred[wrong] = rng.choice(classes, size=int(wrong.sum()))
    pred[pred == IGNORE_ID] = classes[0]
    image = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    return image, truth, pred


def _confusion(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return confusion_matrix(torch.from_numpy(pred), torch.from_numpy(truth), K).numpy()


# --------------------------------------------------------------------------- thumbnails


def test_thumbnail_layout_and_mask_colours() -> None:
    image, truth, pred = _scene(0, 0.3)
    thumb = make_thumbnail(image, truth, pred, CLASS_MAP)
    pw = round(W * THUMBNAIL_HEIGHT / H)  # 160
    assert thumb.mode == "RGB" and thumb.size == (3 * pw + 4, THUMBNAIL_HEIGHT)
    arr = np.asarray(thumb)
    truth_rgb = CLASS_MAP.colorize(_sample_at_centres(truth, THUMBNAIL_HEIGHT, pw))
    np.testing.assert_array_equal(arr[:, pw + 2 : 2 * pw + 2], truth_rgb)
    np.testing.assert_array_equal(
        arr[:, 2 * pw + 4 :], CLASS_MAP.colorize(_sample_at_centres(pred, THUMBNAIL_HEIGHT, pw))
    )
    assert (arr[0, pw + 2] == 255).all()  # the ignored corner is white
    assert (arr[:, pw : pw + 2] == 40).all() and (arr[:, 2 * pw + 2 : 2 * pw + 4] == 40).all()


def test_thumbnail_without_truth_and_image_panel() -> None:
    # A two-colour image: left half red, right half blue; big, so the box reduction runs.
    image = np.zeros((540, 960, 3), dtype=np.uint8)
    image[:, :480] = (200, 10, 10)
    image[:, 480:] = (10, 10, 200)
    pred = np.full((540, 960), 3, dtype=np.uint8)
    thumb = np.asarray(make_thumbnail(image, None, pred, CLASS_MAP, height=54))
    assert thumb.shape == (54, 2 * 96 + 2, 3)
    np.testing.assert_array_equal(thumb[:, :40], np.broadcast_to((200, 10, 10), (54, 40, 3)))
    np.testing.assert_array_equal(thumb[:, 56:96], np.broadcast_to((10, 10, 200), (54, 40, 3)))
    assert (thumb[:, 98:] == CLASS_MAP.palette[3]).all()


def test_thumbnail_rejects_mismatched_inputs() -> None:
    image, truth, pred = _scene(1, 0.1)
    with pytest.raises(ValueError, match="truth"):
        make_thumbnail(image, truth[:10], pred, CLASS_MAP)
    with pytest.raises(ValueError, match="uint8"):
        make_thumbnail(image.astype(np.float32), truth, pred, CLASS_MAP)
    with pytest.raises(ValueError, match="height"):
        make_thumbnail(image, truth, pred, CLASS_MAP, height=0)


def test_save_thumbnail_formats(tmp_path: Path) -> None:
    image, truth, pred = _scene(2, 0.0)
    thumb = make_thumbnail(image, truth, pred, CLASS_MAP)
    save_thumbnail(tmp_path / "a.png", thumb)
    save_thumbnail(tmp_path / "sub" / "a.jpg", thumb)
    with Image.open(tmp_path / "a.png") as png:
        assert png.format == "PNG"
        np.testing.assert_array_equal(np.asarray(png), np.asarray(thumb))
    with Image.open(tmp_path / "sub" / "a.jpg") as jpg:
        assert jpg.format == "JPEG" and jpg.size == thumb.size
        # lossy, but the mask panels keep their colours: most pixels within a few levels
        masks = slice(thumb.size[0] // 3 + 2, None)
        err = np.abs(np.asarray(jpg, dtype=np.int16) - np.asarray(thumb, dtype=np.int16))
        assert np.median(err[:, masks].max(axis=-1)) <= 6
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.jpg"]
    with pytest.raises(ValueError, match=r"\.jpg or \.png"):
        save_thumbnail(tmp_path / "a.gif", thumb)


# --------------------------------------------------------------------------- the report


class _Report:
    """A report of N_IMAGES synthetic images, with what a test needs to check it."""

    def __init__(self, root: Path) -> None:
        self.path = root / "report.html"
        self.rows: list[ImageRow] = []
        self.ious: dict[str, np.ndarray] = {}
        self.thumbnails: list[np.ndarray] = []
        total = np.zeros((K, K), dtype=np.int64)
        # error rates in a mixed order, so the page's order is not the input's
        for i, rate in enumerate([0.3, 0.05, 0.6, 0.15, 0.45]):
            image, truth, pred = _scene(10 + i, rate)
            name = f"img_{i}.png"
            save_thumbnail(
                root / "thumbs" / f"img_{i}.jpg", make_thumbnail(image, truth, pred, CLASS_MAP)
            )
            with Image.open(root / "thumbs" / f"img_{i}.jpg") as img:
                self.thumbnails.append(np.asarray(img.convert("RGB")))
            comparison = None
            if i < 2:
                comparison = Path("comparisons") / name
                panel = overlays.comparison_panel(
                    image, CLASS_MAP.colorize(truth), CLASS_MAP.colorize(pred), CLASS_MAP
                )
                plots.save_png(root / comparison, panel)
            cm = _confusion(truth, pred)
            total += cm
            self.rows.append(ImageRow(name, cm, Path("thumbs") / f"img_{i}.jpg", comparison))
            self.ious[name] = _reference_iou(truth, pred)
        self.metrics = SegMetrics.from_confusion(total, CLASS_MAP.names)
        plots.plot_per_class_metrics(
            self.metrics.names, self.metrics.iou, self.metrics.dice, root / "per_class.png"
        )
        plots.plot_confusion_matrix(self.metrics.confusion, self.metrics.names, root / "cm.png")
        self.figures = {
            "Per-class IoU and Dice": Path("per_class.png"),
            "Confusion": root / "cm.png",
        }
        returned = write_report(
            self.path,
            "Eval <val>",
            self.metrics,
            self.rows,
            CLASS_MAP,
            SETTINGS,
            self.figures,
            banner=BANNER,
            hackathon=HACKATHON,
        )
        assert returned == self.path
        self.html = self.path.read_text()

    @property
    def worst_first(self) -> list[str]:
        return sorted(self.ious, key=lambda name: np.nanmean(self.ious[name]))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> _Report:
    return _Report(tmp_path_factory.mktemp("report"))


class _Rows(HTMLParser):
    """The image table's rows: data-name and the cell texts, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, list[str]]] = []
        self.in_table = False
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self.in_table = a.get("id") == "image-table"
        elif self.in_table and tag == "tr" and "data-name" in a:
            self.rows.append((a["data-name"] or "", []))
        elif self.in_table and tag == "td" and self.rows:
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.in_table = False
        elif tag == "td" and self.cell is not None:
            self.rows[-1][1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def _image_rows(html: str) -> list[tuple[str, list[str]]]:
    parser = _Rows()
    parser.feed(html)
    return parser.rows


def test_report_rows_worst_first_with_reference_metrics(report: _Report) -> None:
    rows = _image_rows(report.html)
    assert [name for name, _ in rows] == report.worst_first
    for rank, (name, cells) in enumerate(rows, start=1):
        ref = report.ious[name]
        # rank, name, mIoU, pixel accuracy, thumbnail, then one IoU per class
        assert len(cells) == 5 + K
        assert cells[0] == str(rank) and cells[1] == name
        assert float(cells[2]) == pytest.approx(np.nanmean(ref), abs=5e-4)
        for c in range(K):
            if math.isnan(ref[c]):
                assert cells[5 + c] == ""
            else:
                assert float(cells[5 + c]) == pytest.approx(ref[c], abs=5e-3)
        assert cells[5 + ABSENT] == ""


def test_report_is_self_contained(report: _Report) -> None:
    html = report.html
    # every image is embedded; nothing is fetched from anywhere
    sources = re.findall(r'<img src="([^"]*)"', html)
    assert len(sources) == N_IMAGES + len(report.figures)
    assert all(s.startswith(("data:image/jpeg;base64,", "data:image/png;base64,")) for s in sources)
    assert "http://" not in html and "https://" not in html
    assert "<link" not in html and "@import" not in html and "<script src" not in html
    # links only to the comparison panels that exist (name and thumbnail), relative to the page
    expected = [
        f"comparisons/{name}" for name in report.worst_first if name in ("img_0.png", "img_1.png")
    ]
    hrefs = re.findall(r'href="(comparisons/[^"]*)"', html)
    assert hrefs == [href for href in expected for _ in range(2)]
    for href in hrefs:
        assert (report.path.parent / href).is_file()


def test_report_header_and_tables(report: _Report) -> None:
    html, m = report.html, report.metrics
    assert "<title>Eval &lt;val&gt;</title>" in html
    assert "data/val &lt;&amp; &#x27;quoted&#x27;&gt;" in html
    for value in (m.miou, m.mean_dice, m.pixel_accuracy, m.mean_class_accuracy):
        assert f">{value:.4f}<" in html
    for i in range(K):  # the per-class table's pixels and the swatch colour
        assert f"{int(m.truth_pixels[i]):,}" in html
        assert "background:#{:02x}{:02x}{:02x}".format(*CLASS_MAP.palette[i]) in html
    # the confusion matrix: one cell per pair, the count in its title
    titles = re.findall(r'title="truth ([^"]*?) → predicted ([^"]*?): ([\d,]+) pixels', html)
    assert len(titles) == K * K
    for truth, pred, count in titles:
        i, j = m.names.index(truth), m.names.index(pred)
        assert int(count.replace(",", "")) == m.confusion[i, j]


def test_report_banner_and_hackathon_numbers(report: _Report, tmp_path: Path) -> None:
    html = report.html
    banner = '<p class="banner" role="alert">UNTRAINED BACKBONE: &lt;random&gt; weights</p>'
    assert html.index(banner) < html.index("<h1>")  # above everything but the links
    section = html[html.index('<h2 id="hackathon">') : html.index('<h2 id="figures">')]
    assert "Hackathon protocol (for comparison only)" in section
    assert HACKATHON_TITLE == "hackathon protocol (for comparison only)"
    for value in ("0.4321", "0.5678", "0.8765"):
        assert f">{value}<" in section
    names = re.findall(r"<th>([^<]*)</th>", section.split("</thead>")[0])
    values = re.findall(r"<td[^>]*>([^<]*)</td>", section.split("</thead>")[1])
    assert names == ["class", "Background", "Trees", "Sky"]
    assert values == ["0.6100", "n/a", "0.2468"]
    assert "3 batches of 2 images (5 images" in section
    # neither without them
    plain = write_report(
        tmp_path / "r.html", "t", report.metrics, [], CLASS_MAP, {}, {}
    ).read_text()
    assert 'class="banner"' not in plain and 'id="hackathon"' not in plain
    assert 'href="#hackathon"' not in plain


def test_provenance_lines() -> None:
    from offroad_seg.models.backbone import BackboneSpec
    from offroad_seg.models.heads import HeadConfig
    from offroad_seg.reporting.provenance import (
        UNTRAINED_BANNER,
        head_text,
        training_text,
        untrained_banner,
        weights_text,
    )

    random, real = BackboneSpec("ab" * 32, "random"), BackboneSpec("cd" * 32, "w/vits14.pth")
    assert untrained_banner(random) == UNTRAINED_BANNER and untrained_banner(real) is None
    assert weights_text(random) == "random (untrained), sha256 abababababab"
    assert weights_text(real) == "w/vits14.pth, sha256 cdcdcdcdcdcd"
    # only the settings a head has
    assert head_text(HeadConfig(name="linear")) == "linear (dropout 0)"
    assert head_text(HeadConfig(name="pyramid")) == "pyramid (width 96, dropout 0.1)"
    settings = dict(preset="seed", loss="ce+0.5dice", class_weights="auto", lr=1e-3,
                    batch_size=2, epochs=20, seed=0)  # fmt: skip
    payload = {
        "train_config": settings,
        "epoch": 17,
        "best": {"epoch": 17, "val_miou": 0.40961},
    }
    assert training_text(payload) == (
        "preset seed, loss ce+0.5dice, class weights auto, AdamW lr 0.001, batch 2, 20 epochs, "
        "seed 0; saved at epoch 17 (best val mIoU 0.4096)"
    )
    # an older checkpoint's missing settings are left out; an exported model has none
    old = {"train_config": {"loss": "ce"}, "epoch": 3}
    assert training_text(old) == "loss ce; saved at epoch 3"
    assert training_text({"backbone": "{}"}) is None


def test_report_thumbnails_open_a_larger_view(report: _Report) -> None:
    # every thumbnail cell is wired to the page's <dialog>, which holds no image until a click
    html = report.html
    assert re.search(r'<dialog id="zoom">.*?</dialog>', html, re.S)
    assert "<img" not in re.search(r'<dialog id="zoom">.*?</dialog>', html, re.S).group(0)
    assert 'querySelectorAll("#image-table td.thumb")' in html and "showModal()" in html
    cells = re.findall(r'<td class="thumb">(.*?)</td>', html)
    assert len(cells) == N_IMAGES
    for name, cell in zip(report.worst_first, cells, strict=True):
        row = next(r for r in report.rows if r.name == name)
        if row.comparison is None:
            assert cell.startswith("<img ")
        else:  # the larger view is the comparison panel, a file beside the page
            assert cell.startswith(f'<a href="comparisons/{name}"><img ')
            assert (report.path.parent / "comparisons" / name).is_file()


def test_report_missing_thumbnail_and_bad_rows(tmp_path: Path) -> None:
    _, truth, pred = _scene(3, 0.2)
    cm = _confusion(truth, pred)
    metrics = SegMetrics.from_confusion(cm, CLASS_MAP.names)
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    rows = [
        ImageRow("gone.png", cm, Path("thumbs/gone.jpg")),
        ImageRow("junk.png", cm, Path("junk.jpg")),
    ]
    path = write_report(tmp_path / "r.html", "t", metrics, rows, CLASS_MAP, {}, {})
    html = path.read_text()
    assert "missing: gone.jpg" in html and "missing: junk.jpg" in html
    assert "<img src" not in html
    assert [name for name, _ in _image_rows(html)] == ["gone.png", "junk.png"]
    # no temporary file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.jpg", "r.html"]

    with pytest.raises(ValueError, match=r"bad\.png: confusion matrix \(3, 3\)"):
        write_report(
            tmp_path / "r.html",
            "t",
            metrics,
            [ImageRow("bad.png", np.zeros((3, 3), np.int64), Path("x.jpg"))],
            CLASS_MAP,
            {},
            {},
        )


def test_report_image_without_pixels_sorts_last(tmp_path: Path) -> None:
    image, truth, pred = _scene(4, 0.2)
    thumb = make_thumbnail(image, truth, pred, CLASS_MAP)
    save_thumbnail(tmp_path / "t.jpg", thumb)
    good = _confusion(truth, pred)
    empty = np.zeros((K, K), dtype=np.int64)  # an all-ignore image: no mIoU
    rows = [ImageRow("empty.png", empty, Path("t.jpg")), ImageRow("good.png", good, Path("t.jpg"))]
    metrics = SegMetrics.from_confusion(good, CLASS_MAP.names)
    html = write_report(tmp_path / "r.html", "t", metrics, rows, CLASS_MAP, {}, {}).read_text()
    parsed = _image_rows(html)
    assert [name for name, _ in parsed] == ["good.png", "empty.png"]
    assert parsed[1][1][2] == "" and all(c == "" for c in parsed[1][1][5:])


# --------------------------------------------------------------------------- in a browser

_CHROMIUM = shutil.which("chromium")
_CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # without these Chromium tries the network at start, and closed networks refuse it
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def _chromium(profile: Path, *args: str) -> str:
    """Chromium's stdout; a failure shows the end of its stderr."""
    done = subprocess.run(
        [_CHROMIUM, *_CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, f"chromium failed: {done.stderr[-2000:]}"
    return done.stdout


def _near(pixels: np.ndarray, colour: np.ndarray, tol: int = 10) -> int:
    return int(
        (np.abs(pixels.astype(np.int16) - colour.astype(np.int16)).max(axis=-1) <= tol).sum()
    )


@pytest.mark.skipif(
    _CHROMIUM is None and not os.environ.get("CI"),
    reason="chromium is not installed (apt-get install chromium); CI runs this test",
)
def test_report_renders_in_chromium(report: _Report, tmp_path: Path) -> None:
    if _CHROMIUM is None:
        pytest.fail("CI is set but chromium is not installed: apt-get install -y chromium")
    shot = tmp_path / "page.png"
    dom = _chromium(
        tmp_path / "profile",
        "--dump-dom",
        f"--screenshot={shot}",
        "--window-size=1500,4200",
        report.path.as_uri(),
    )

    # the page's own check: every embedded image decoded
    marker = re.search(r'<body[^>]*data-images-ok="(\d+)"[^>]*data-images-total="(\d+)"', dom)
    assert marker, "the page's load script did not run"
    assert int(marker.group(1)) == int(marker.group(2)) == N_IMAGES + len(report.figures)
    assert [name for name, _ in _image_rows(dom)] == report.worst_first

    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.shape == (4200, 1500, 3)
    assert pixels.std() > 20  # not a blank page
    # the thumbnails are on screen: their most common class colours cover as many pixels as in
    # the thumbnail files (the page's 11 px swatches add a few hundred, far fewer)
    thumbs = np.concatenate([t.reshape(-1, 3) for t in report.thumbnails])
    for colour in CLASS_MAP.palette[[1, 2, 9, 10]]:
        expected = _near(thumbs, colour)
        assert expected > 2000
        assert _near(pixels, colour) >= 0.9 * expected, f"colour {colour} is missing"


def test_report_embeds_the_thumbnail_files(report: _Report) -> None:
    # byte for byte, in the page's (worst-first) order
    embedded = [
        base64.b64decode(data)
        for data in re.findall(r'<img src="data:image/jpeg;base64,([^"]*)"', report.html)
    ]
    files = {row.name: (report.path.parent / row.thumbnail).read_bytes() for row in report.rows}
    assert embedded == [files[name] for name in report.worst_first]
    with Image.open(io.BytesIO(embedded[0])) as img:
        assert img.size == (3 * 160 + 4, THUMBNAIL_HEIGHT)


@pytest.mark.skipif(
    _CHROMIUM is None and not os.environ.get("CI"),
    reason="chromium is not installed (apt-get install chromium); CI runs this test",
)
def test_report_zoom_shows_the_comparison_panel_in_chromium(report: _Report, tmp_path) -> None:
    if _CHROMIUM is None:
        pytest.fail("CI is set but chromium is not installed: apt-get install -y chromium")
    # report.html#zoom=NAME runs what a click on NAME's thumbnail runs
    dom = _chromium(
        tmp_path / "profile",
        "--dump-dom",
        "--virtual-time-budget=5000",
        report.path.as_uri() + "#zoom=img_0.png",
    )
    dialog = re.search(r"<dialog[^>]*>.*?</dialog>", dom, re.S).group(0)
    with Image.open(report.path.parent / "comparisons" / "img_0.png") as panel:
        size = f"{panel.size[0]}x{panel.size[1]}"
    opened = re.match(r"<dialog ([^>]*)>", dialog).group(1).split()
    assert sorted(opened) == ['data-loaded="' + size + '"', 'id="zoom"', 'open=""'], dialog[:200]
    image = '<img alt="img_0.png: image | truth | prediction" src="comparisons/img_0.png">'
    assert image in dialog
