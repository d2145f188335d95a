"""A one-file HTML evaluation report: what was evaluated (the model's provenance, and a banner
when its backbone was untrained), overall and per-class metrics, the hackathon protocol's
numbers, the figures, the confusion matrix, and every image as a row with its own metrics and
a thumbnail, worst first. A click on a thumbnail opens a larger view in the page (a <dialog>):
the image's full-size comparison panel where evaluate wrote one, else the thumbnail enlarged.

The page is self-contained (no network, no external CSS, JS or fonts): figures and thumbnails
are embedded as base64 data URIs, so `report.html` can be mailed or opened from anywhere. Only
the links to the full-size comparison panels point outside it, relative to its folder.

Per-image metrics come from each image's (K, K) confusion matrix through `SegMetrics`, so an
image's mIoU means exactly what the split's does (classes present in its truth or prediction).

The thumbnails it embeds are made while evaluating (`thumbnails.py`).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
from PIL import Image, UnidentifiedImageError

from offroad_seg.core.atomic import write_text_atomic
from offroad_seg.data.classes import IGNORE_ID, ClassMap
from offroad_seg.metrics.confusion import SegMetrics
from offroad_seg.metrics.hackathon import HACKATHON_TITLE, HackathonMetrics

log = logging.getLogger(__name__)

__all__ = ["ImageRow", "image_metrics", "write_report"]

_IGNORE_COLOR = (255, 255, 255)
_BROWSER_FORMATS = ("image/jpeg", "image/png", "image/webp", "image/gif")


@dataclass(frozen=True, eq=False)  # eq would compare arrays, which has no single answer
class ImageRow:
    """One evaluated image: its (K, K) int64 confusion matrix (rows truth, columns prediction,
    as `metrics.confusion_matrix`), its thumbnail and optional comparison panel, both given
    relative to the report's folder."""

    name: str
    confusion: np.ndarray
    thumbnail: Path
    comparison: Path | None = None


def image_metrics(row: ImageRow, names: list[str]) -> SegMetrics:
    """An image's metrics, from its own confusion matrix: the numbers of its row in the report
    (and of its entry in evaluate's metrics.json)."""
    return SegMetrics.from_confusion(row.confusion, names)


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _href(path: Path) -> str:
    return quote(Path(path).as_posix())


def _hex(color: tuple[int, int, int] | np.ndarray) -> str:
    r, g, b = (int(v) for v in color)
    return f"#{r:02x}{g:02x}{b:02x}"


def _fmt(value: float, digits: int = 3) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _fmt_or_na(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _score_style(value: float) -> str:
    """A red (0) -> yellow -> green (1) background, so bad cells stand out in long tables."""
    if math.isnan(value):
        return ""
    hue = round(120 * min(max(value, 0.0), 1.0))
    return f' style="background:hsl({hue},75%,84%)"'


def _img(path: Path, alt: str) -> str:
    """An <img> holding the file as a data URI, sized from its header; a missing or unreadable
    file becomes a note on the page and a warning in the log, not an error."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            mime = im.get_format_mimetype()
            width, height = im.size
    except (OSError, UnidentifiedImageError) as e:
        log.warning("report: cannot embed %s (%s)", path, e)
        return f'<span class="missing">missing: {_esc(path.name)}</span>'
    if mime not in _BROWSER_FORMATS:
        log.warning("report: cannot embed %s (%s is not shown by browsers)", path, mime)
        return f'<span class="missing">not PNG/JPEG: {_esc(path.name)}</span>'
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return f'<img src="{uri}" alt="{_esc(alt)}" width="{width}" height="{height}">'


def _swatch(color: tuple[int, int, int] | np.ndarray) -> str:
    return f'<span class="sw" style="background:{_hex(color)}"></span>'


def _settings_html(title: str, settings: dict[str, str], n_images: int) -> str:
    shown = settings if "images" in settings else {**settings, "images": str(n_images)}
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in shown.items())
    return f'<h1>{_esc(title)}</h1>\n<table class="settings">{rows}</table>'


def _banner_html(banner: str | None) -> str:
    return f'<p class="banner" role="alert">{_esc(banner)}</p>' if banner else ""


def _hackathon_html(hackathon: HackathonMetrics | None) -> str:
    """The hackathon protocol's numbers: comparable with those published on the dataset, not
    our metric (see metrics.hackathon)."""
    if hackathon is None:
        return ""
    cards = (
        ("mIoU", hackathon.miou),
        ("mean Dice", hackathon.dice),
        ("pixel accuracy", hackathon.pixel_accuracy),
    )
    body = "".join(
        f'<div class="card"><div class="v">{_fmt_or_na(v)}</div><div>{_esc(k)}</div></div>'
        for k, v in cards
    )
    # one row across the page: the section stays as short as the cards above it
    names = "".join(f"<th>{_esc(n)}</th>" for n in hackathon.class_names)
    values = "".join(f"<td{_score_style(v)}>{_fmt_or_na(v)}</td>" for v in hackathon.class_iou)
    return (
        f'<h2 id="hackathon">{_esc(HACKATHON_TITLE[0].upper() + HACKATHON_TITLE[1:])}</h2>\n'
        f"<p>Means over {hackathon.num_batches} batches of {hackathon.batch_size} images "
        f"({hackathon.num_images} images, sorted by name), as the hackathon's starter "
        "evaluation scores them: comparable with the numbers published on this dataset, not "
        "with ours above.</p>\n"
        f'<div class="cards">{body}</div>\n'
        f'<table class="grid hackathon"><thead><tr><th>class</th>{names}</tr></thead>'
        f"<tbody><tr><th>IoU</th>{values}</tr></tbody></table>\n"
        '<p class="dim">Per class: the mean IoU over the batches where the class occurs.</p>'
    )


def _summary_html(metrics: SegMetrics) -> str:
    cards = [
        ("mIoU", metrics.miou),
        ("mean Dice", metrics.mean_dice),
        ("pixel accuracy", metrics.pixel_accuracy),
        ("mean class accuracy", metrics.mean_class_accuracy),
    ]
    if metrics.loss is not None:
        cards.append(("loss", metrics.loss))
    body = "".join(
        f'<div class="card"><div class="v">{_fmt_or_na(v)}</div><div>{_esc(k)}</div></div>'
        for k, v in cards
    )
    return f'<h2 id="summary">Overall</h2>\n<div class="cards">{body}</div>'


def _per_class_html(metrics: SegMetrics, class_map: ClassMap) -> str:
    head = (
        '<tr><th data-sort="text">class</th><th data-sort="num">IoU</th>'
        '<th data-sort="num">Dice</th><th data-sort="num">accuracy</th>'
        '<th data-sort="num">truth pixels</th><th data-sort="num">predicted pixels</th></tr>'
    )
    rows = []
    for i, name in enumerate(metrics.names):
        iou, dice, accuracy = metrics.iou[i], metrics.dice[i], metrics.class_accuracy[i]
        truth_px, pred_px = int(metrics.truth_pixels[i]), int(metrics.pred_pixels[i])
        rows.append(
            f"<tr><td>{_swatch(class_map.palette[i])}{_esc(name)}</td>"
            f'<td data-v="{_fmt(iou, 6)}"{_score_style(iou)}>{_fmt_or_na(iou)}</td>'
            f'<td data-v="{_fmt(dice, 6)}"{_score_style(dice)}>{_fmt_or_na(dice)}</td>'
            f'<td data-v="{_fmt(accuracy, 6)}"{_score_style(accuracy)}>'
            f"{_fmt_or_na(accuracy)}</td>"
            f'<td data-v="{truth_px}">{truth_px:,}</td><td data-v="{pred_px}">{pred_px:,}</td></tr>'
        )
    return (
        '<h2 id="classes">Per class</h2>\n<table class="grid sortable narrow">'
        f"<thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _figures_html(figures: dict[str, Path], root: Path) -> str:
    if not figures:
        return ""
    items = "".join(
        f"<figure>{_img(root / path, caption)}<figcaption>{_esc(caption)}</figcaption></figure>"
        for caption, path in figures.items()
    )
    return f'<h2 id="figures">Figures</h2>\n<div class="figures">{items}</div>'


def _confusion_html(metrics: SegMetrics, class_map: ClassMap) -> str:
    cm = metrics.confusion
    rows_total = cm.sum(axis=1)
    header = "".join(
        f'<th class="col">{_swatch(class_map.palette[j])}{_esc(n)}</th>'
        for j, n in enumerate(metrics.names)
    )
    body = []
    for i, truth in enumerate(metrics.names):
        cells = []
        for j, pred in enumerate(metrics.names):
            count = int(cm[i, j])
            frac = count / rows_total[i] if rows_total[i] > 0 else 0.0
            tip = f"truth {truth} → predicted {pred}: {count:,} pixels"
            if rows_total[i] > 0:
                tip += f" ({100 * frac:.2f}% of {int(rows_total[i]):,})"
            text = "" if count == 0 else (f"{frac:.2f}" if frac >= 0.005 else "<.01")
            style = f"background:rgba(31,119,180,{frac:.3f})"
            if frac > 0.55:
                style += ";color:#fff"
            diag = ' class="diag"' if i == j else ""
            cells.append(f'<td{diag} style="{style}" title="{_esc(tip)}">{_esc(text)}</td>')
        label = f"{int(rows_total[i]):,} px" if rows_total[i] > 0 else "no pixels"
        body.append(
            f'<tr><th class="row">{_swatch(class_map.palette[i])}{_esc(truth)} '
            f'<span class="dim">({label})</span></th>{"".join(cells)}</tr>'
        )
    return (
        '<h2 id="confusion">Confusion matrix</h2>\n'
        "<p>Rows: ground truth; columns: prediction. Each row is divided by its pixel count; "
        "hover a cell for the count.</p>\n"
        '<table class="grid confusion"><thead><tr><th class="corner">truth \\ prediction</th>'
        f"{header}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def _sort_key(item: tuple[int, SegMetrics, ImageRow]) -> tuple[bool, float, str]:
    _, m, row = item
    miou = m.miou
    return (math.isnan(miou), 0.0 if math.isnan(miou) else miou, row.name)


def _images_html(rows: list[ImageRow], class_map: ClassMap, root: Path) -> str:
    k = class_map.num_classes
    names = class_map.names
    scored = []
    for index, row in enumerate(rows):
        cm = np.asarray(row.confusion)
        if cm.shape != (k, k):
            raise ValueError(
                f"write_report: image {row.name}: confusion matrix {cm.shape}, expected ({k}, {k})"
            )
        scored.append((index, image_metrics(row, names), row))
    scored.sort(key=_sort_key)

    class_heads = "".join(
        f'<th data-sort="num" class="cls"><span>{_swatch(color)}{_esc(n)}</span></th>'
        for n, color in zip(names, class_map.palette, strict=True)
    )
    head = (
        '<tr><th data-sort="num">#</th><th data-sort="text">image</th>'
        '<th data-sort="num">mIoU</th><th data-sort="num">pixel acc.</th>'
        "<th>image | truth | prediction</th>"
        f"{class_heads}</tr>"
    )
    body = []
    for rank, (_, m, row) in enumerate(scored, start=1):
        link = f' href="{_href(row.comparison)}"' if row.comparison is not None else ""
        name = f"<a{link}>{_esc(row.name)}</a>" if link else _esc(row.name)
        thumb = _img(root / row.thumbnail, f"{row.name}: image | truth | prediction")
        if link:  # the page's script opens it in the page; without script, the link does
            thumb = f"<a{link}>{thumb}</a>"
        iou = m.iou
        class_cells = "".join(
            f'<td data-v="{_fmt(v, 6)}"{_score_style(v)}>{_fmt(v, 2)}</td>' for v in iou
        )
        body.append(
            f'<tr data-name="{_esc(row.name)}"><td data-v="{rank}">{rank}</td>'
            f'<td class="name">{name}</td>'
            f'<td data-v="{_fmt(m.miou, 6)}"{_score_style(m.miou)}>{_fmt(m.miou)}</td>'
            f'<td data-v="{_fmt(m.pixel_accuracy, 6)}">{_fmt(m.pixel_accuracy)}</td>'
            f'<td class="thumb">{thumb}</td>{class_cells}</tr>'
        )
    legend = (
        " ".join(
            f'<span class="key">{_swatch(c.color)}{_esc(c.name)}</span>' for c in class_map.classes
        )
        + f' <span class="key">{_swatch(_IGNORE_COLOR)}ignore ({IGNORE_ID})</span>'
    )
    return (
        f'<h2 id="images">Images ({len(rows)}), worst first</h2>\n'
        "<p>Sorted by the image's mIoU (over the classes in its truth or prediction); a class's "
        "IoU is blank where it is absent from both. Click a column header to sort by it; click "
        "a thumbnail for a larger view: the full-size comparison panel where evaluate wrote "
        "one (its name links to it too; --comparisons N writes the first N), else the "
        "thumbnail enlarged.</p>\n"
        f'<p class="legend">{legend}</p>\n'
        f'<table class="grid sortable images" id="image-table"><thead>{head}</thead>'
        f"<tbody>{''.join(body)}</tbody></table>\n"
        # filled by the script on a thumbnail's click: no image in it until then
        '<dialog id="zoom"><form method="dialog"><button>close</button></form>'
        '<p class="zoom-title"></p><div class="zoom-body"></div></dialog>'
    )


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;
 color:#1a1a1a;background:#fff;margin:0 16px 40px}
h1{font-size:22px;margin:18px 0 8px}h2{font-size:18px;margin:28px 0 8px;
 border-bottom:1px solid #ddd;padding-bottom:4px}
nav{padding:8px 0;border-bottom:1px solid #eee}
nav a{margin-right:14px}
a{color:#0b5cad}
table{border-collapse:collapse}
.settings th{text-align:left;padding:1px 14px 1px 0;color:#555;font-weight:normal}
.settings td{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 16px;min-width:120px;color:#555}
.card .v{font-size:24px;color:#1a1a1a;font-variant-numeric:tabular-nums}
.grid th,.grid td{border:1px solid #ddd;padding:3px 6px}
.grid td{text-align:right;font-variant-numeric:tabular-nums}
.grid td.name,.grid td:first-child{text-align:left}
.grid thead th{position:sticky;top:0;z-index:2;background:#f4f4f4;vertical-align:bottom}
.sortable th[data-sort]{cursor:pointer}
.sortable th[aria-sort=ascending]::after{content:" \\25B2"}
.sortable th[aria-sort=descending]::after{content:" \\25BC"}
.sw{display:inline-block;width:11px;height:11px;border:1px solid #777;margin-right:5px;
 vertical-align:-1px}
.figures{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
figure{margin:0;flex:1 1 520px;max-width:760px}
figure img{width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:13px}
.confusion td{min-width:34px;text-align:center;font-size:12px}
.confusion td.diag{outline:2px solid #333;outline-offset:-2px}
.confusion th.col{font-size:12px;font-weight:normal;max-width:70px}
.confusion th.row{text-align:left;font-weight:normal;white-space:nowrap}
.dim{color:#777;font-size:12px}
/* class names written upwards: 11 IoU columns stay narrow enough for a 1280 px screen */
.images th.cls{font-size:12px;font-weight:normal;padding:4px 2px}
.images th.cls span{writing-mode:vertical-rl;transform:rotate(180deg);white-space:nowrap}
.images th.cls .sw{margin:0 0 4px 0}
.images td{font-size:13px;padding:3px 4px}
.images td.name{min-width:9em;max-width:22em;overflow-wrap:anywhere}
.images td.thumb{padding:2px;line-height:0}
.legend .key{margin-right:12px;white-space:nowrap}
.missing{color:#b00;font-size:12px}
.hackathon{margin-top:12px}
.banner{border:2px solid #b00;background:#fde8e8;color:#700;padding:8px 12px;font-weight:600}
.images td.thumb img{cursor:zoom-in}
#zoom{max-width:96vw;max-height:94vh;padding:8px 12px;border:1px solid #999}
#zoom::backdrop{background:rgba(0,0,0,.6)}
#zoom form{float:right;margin:0}
#zoom .zoom-title{margin:0 0 6px;font-weight:600}
#zoom .zoom-body img{display:block;min-width:min(92vw,1200px);max-width:92vw;max-height:84vh}
"""

# Sorting by clicking a header; the page is already sorted worst first without it. The
# data-images-ok marker counts the images that decoded (a check for tests and readers alike).
_JS = """
(function(){
function val(td,num){var v=td.getAttribute("data-v");if(v===null)v=td.textContent;
 if(!num)return v.toLowerCase();return v===""?NaN:parseFloat(v);}
document.querySelectorAll("table.sortable").forEach(function(table){
 table.querySelectorAll("th[data-sort]").forEach(function(th){
  th.addEventListener("click",function(){
   var num=th.getAttribute("data-sort")==="num",col=th.cellIndex;
   var dir=th.getAttribute("aria-sort")==="ascending"?-1:1;
   table.querySelectorAll("th[aria-sort]").forEach(function(h){h.removeAttribute("aria-sort");});
   th.setAttribute("aria-sort",dir>0?"ascending":"descending");
   var body=table.tBodies[0],rows=Array.prototype.slice.call(body.rows);
   rows.sort(function(a,b){var x=val(a.cells[col],num),y=val(b.cells[col],num);
    if(num){if(isNaN(x))return isNaN(y)?0:1;if(isNaN(y))return -1;return dir*(x-y);}
    return dir*(x<y?-1:x>y?1:0);});
   rows.forEach(function(r){body.appendChild(r);});
  });
 });
});
// a thumbnail's click opens a larger view in the page; a modified click (new tab) or no
// script at all follows its link to the comparison panel instead
var zoom=document.getElementById("zoom");
function showZoom(row){
 var cell=row.querySelector("td.thumb"),small=cell&&cell.querySelector("img");
 if(!small||!zoom||!zoom.showModal)return false;
 var link=cell.querySelector("a"),big=document.createElement("img");
 var body=zoom.querySelector(".zoom-body");
 big.alt=small.alt;
 big.onload=function(){zoom.setAttribute("data-loaded",big.naturalWidth+"x"+big.naturalHeight);};
 if(link){big.src=link.getAttribute("href");}
 else{big.src=small.src;}
 zoom.removeAttribute("data-loaded");
 zoom.querySelector(".zoom-title").textContent=row.getAttribute("data-name")+
  (link?"":" (thumbnail: no full-size panel was written for this image)");
 body.textContent="";body.appendChild(big);
 zoom.showModal();
 return true;
}
document.querySelectorAll("#image-table td.thumb").forEach(function(td){
 td.addEventListener("click",function(e){
  if(e.button!==0||e.ctrlKey||e.metaKey||e.shiftKey||e.altKey)return;
  if(showZoom(td.parentNode))e.preventDefault();
 });
});
if(zoom)zoom.addEventListener("click",function(e){if(e.target===zoom)zoom.close();});
window.addEventListener("load",function(){
 var ok=0,imgs=document.images;
 for(var i=0;i<imgs.length;i++){if(imgs[i].complete&&imgs[i].naturalWidth>0)ok++;}
 document.body.setAttribute("data-images-ok",String(ok));
 document.body.setAttribute("data-images-total",String(imgs.length));
 // report.html#zoom=NAME opens that image's larger view (a link one can share)
 var m=/^#zoom=(.+)$/.exec(location.hash);
 if(m){var name=decodeURIComponent(m[1]);
  document.querySelectorAll("#image-table tr[data-name]").forEach(function(r){
   if(r.getAttribute("data-name")===name)showZoom(r);});}
});
})();
"""


def write_report(
    path: Path,
    title: str,
    metrics: SegMetrics,
    rows: list[ImageRow],
    class_map: ClassMap,
    settings: dict[str, str],
    figures: dict[str, Path],
    banner: str | None = None,
    hackathon: HackathonMetrics | None = None,
) -> Path:
    """Write the evaluation report as one self-contained HTML file at `path`, atomically.

    `metrics` is the split's; `rows` one per image (any order: the page lists them worst
    first by their own mIoU, images without any scored pixel last). `settings` (head, data,
    backbone, TTA, date, ...) are shown as given, in order, with the image count added unless
    they hold an "images" entry. `figures` maps a caption to a PNG
    (e.g. per_class_metrics.png); relative paths, like the rows' thumbnails and comparison
    panels, are relative to `path`'s folder. Figures and thumbnails are embedded; a missing
    one is named on the page and logged, not fatal. `banner`: a warning shown above
    everything (an untrained backbone); `hackathon`: the hackathon protocol's numbers, shown
    after ours. Returns `path`.
    """
    path = Path(path)
    root = path.parent
    if len(metrics.names) != class_map.num_classes:
        raise ValueError(
            f"write_report: metrics for {len(metrics.names)} classes, class map has "
            f"{class_map.num_classes}"
        )
    nav = "".join(
        f'<a href="#{anchor}">{label}</a>'
        for anchor, label in (
            ("summary", "Overall"),
            ("classes", "Per class"),
            ("hackathon", "Hackathon protocol"),
            ("figures", "Figures"),
            ("confusion", "Confusion matrix"),
            ("images", "Images"),
        )
        if (anchor != "figures" or figures) and (anchor != "hackathon" or hackathon)
    )
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_esc(title)}</title>",
            f"<style>{_CSS}</style></head>",
            "<body>",
            f"<nav>{nav}</nav>",
            _banner_html(banner),
            _settings_html(title, settings, len(rows)),
            _summary_html(metrics),
            _per_class_html(metrics, class_map),
            _hackathon_html(hackathon),
            _figures_html(figures, root),
            _confusion_html(metrics, class_map),
            _images_html(rows, class_map, root),
            f"<script>{_JS}</script>",
            "</body></html>",
            "",
        ]
    )
    write_text_atomic(path, page)
    return path
