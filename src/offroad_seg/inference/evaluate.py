"""Evaluation: full predictions of a labelled dataset, scored end to end from the images.

`evaluate` writes masks, colour masks, comparison panels, thumbnails, metrics (ours, and the
hackathon protocol's for comparison), plots and `report.html`. Logits are upsampled (bilinear)
to each image's original size, so what is measured is what a user would deploy. At the end,
after every rank is done, rank 0 computes the metrics from all records in image order (the
summed confusion matrices: equal to one process's exactly) and writes the summary files,
`metrics.json` last: its presence means complete. Batches, resuming and sharding:
`batches.py`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from offroad_seg import __version__
from offroad_seg.config import EvalConfig
from offroad_seg.core import distributed
from offroad_seg.core.atomic import write_json_atomic, write_text_atomic
from offroad_seg.core.runtime import resolve_device
from offroad_seg.core.text import plural
from offroad_seg.data.classes import IGNORE_ID, ClassMap, resolve_class_map
from offroad_seg.data.dataset import Sample, check_headers, list_samples
from offroad_seg.data.digest import sources_digest
from offroad_seg.data.layout import OutputLayout, output_layout
from offroad_seg.errors import OffroadSegError
from offroad_seg.features.loader import (
    DecodeOptions,
    default_batch_size,
)
from offroad_seg.inference.batches import EvalResult, named_write_errors, run_batches, start_run
from offroad_seg.inference.engines import build_engine, check_engine_tta, load_head, resolve_engine
from offroad_seg.inference.image_outputs import save_color_mask, save_mask
from offroad_seg.inference.runfolder import RecordLog, RunPlan, read_records
from offroad_seg.metrics.confusion import SegMetrics, confusion_matrix
from offroad_seg.metrics.hackathon import (
    HACKATHON_SIZE,
    HackathonMetrics,
    hackathon_image_counts,
    hackathon_prediction,
    hackathon_scores,
)
from offroad_seg.models.backbone import BackboneSpec
from offroad_seg.models.checkpoint import (
    HeadCheckpoint,
    expect_dataset,
    file_sha256,
    looks_like_head,
    resolve_head,
)
from offroad_seg.models.segmentation import TTA
from offroad_seg.models.upsampling import predict_and_score
from offroad_seg.reporting.report import ImageRow, image_metrics
from offroad_seg.reporting.thumbnails import THUMBNAIL_HEIGHT, make_thumbnail, save_thumbnail

log = logging.getLogger(__name__)


THUMBNAILS = "thumbnails"
# evaluate's run-level files, in the order written: metrics.json last marks a complete run
EVAL_FILES = ("per_class_metrics.png", "confusion_matrix.png", "evaluation_metrics.txt",
              "report.html", "metrics.json")  # fmt: skip


def _rows(batch: dict, key: str) -> list:
    """A batch field as one entry per image (stacked tensors or lists)."""
    value = batch[key]
    return list(value) if isinstance(value, torch.Tensor) else value


def _eval_identity(
    cfg: EvalConfig, ckpt, samples, batch_size, device, tta, engine: str
) -> dict[str, Any]:
    """The settings that decide evaluate's outputs: a rerun with the same ones resumes."""
    return {
        "command": "evaluate",
        "tool_version": __version__,
        "head": str(cfg.head),
        "head_sha256": file_sha256(cfg.head),
        "data": str(cfg.data_dir),
        "sources": sources_digest([(s.name, s.image, s.mask) for s in samples]),
        "tta": tta.describe(ckpt.preprocessing),
        "engine": engine,
        "batch_size": batch_size,
        "device": device.type,
        "comparisons": cfg.comparisons,
        "masks": cfg.write_masks,
        "ignore_unknown_codes": cfg.ignore_unknown_codes,
    }


def _head_argument(cfg: EvalConfig) -> Path:
    """The head file (a run folder's head), or one line when the head and the dataset were
    given the other way round."""
    try:
        return resolve_head(cfg.head)
    except OffroadSegError:
        if looks_like_head(cfg.data_dir):
            raise OffroadSegError(
                f"{cfg.head}, {cfg.data_dir}: the head and the dataset are swapped "
                "(evaluate takes the head first: HEAD DATA_DIR OUT)"
            ) from None
        raise


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Predict every image of a labelled dataset; write predictions, metrics and a report."""
    cfg = replace(cfg, head=_head_argument(cfg))
    expect_dataset(cfg.data_dir)
    tta = TTA.of(cfg.tta, cfg.tta_scales)
    engine = resolve_engine(cfg.engine, cfg.head, cfg.weights)
    ckpt = load_head(cfg.head)
    check_engine_tta(cfg.head, ckpt, tta)
    class_map = ckpt.class_map
    asked = resolve_class_map(cfg.class_map) if cfg.class_map is not None else class_map
    if asked != class_map:
        raise OffroadSegError(
            f"{cfg.head}: trained with another class map than {cfg.class_map} "
            f"(the head's vs {cfg.class_map}: {class_map.difference(asked)})"
        )
    samples = list_samples(cfg.data_dir)
    check_headers(samples)
    device = resolve_device(cfg.device)
    with distributed.launched(device) as world:
        device = world.device(device)
        batch_size = cfg.batch_size or default_batch_size(device)
        identity = _eval_identity(cfg, ckpt, samples, batch_size, device, tta, engine)
        # the whole model loads before any output exists: one that cannot is refused first
        model = build_engine(engine, ckpt, cfg.weights, device, tta)
        layout = output_layout([s.image for s in samples])
        plan = _eval_plan(cfg, samples, layout)
        records, todo, mine = start_run(cfg, identity, plan, len(samples), batch_size, world)
        if world.is_main and records and todo:
            log.info("resuming %s: %s left", cfg.out, plural(sum(map(len, todo)), "image"))
        seconds = 0.0
        with named_write_errors(cfg.out):
            if mine:
                seconds = _evaluate_batches(cfg, samples, layout, mine, model, tta, device,
                                            world)  # fmt: skip
            world.barrier()
            done = sum(map(len, todo))
            result = EvalResult(cfg.out, None, len(samples), seconds, computed=done)
            if world.is_main:
                records = read_records(cfg.out)  # once: a million records take a while
                result.metrics, result.hackathon = split_metrics(
                    cfg.out, samples, class_map, records
                )
                result.files = write_eval_outputs(
                    cfg, ckpt, samples, layout, result, identity, records, model.backbone_spec
                )
        world.barrier()
    return result


def _eval_files(cfg: EvalConfig, name: str, comparison: bool) -> list[str]:
    """One image's files in an evaluate folder (relative paths), from its output name."""
    files = [f"masks/{name}", f"masks_color/{name}"] if cfg.write_masks else []
    files += [f"comparisons/{name}"] if comparison else []
    return [*files, f"{THUMBNAILS}/{_thumbnail_name(name)}"]


def _eval_plan(cfg: EvalConfig, samples: list[Sample], layout: OutputLayout) -> RunPlan:
    top = ("masks", "masks_color") if cfg.write_masks else ()
    top += ("comparisons",) if cfg.comparisons > 0 else ()
    top += (THUMBNAILS,)
    folders = (*top, *(f"{t}/{sub}" for t in top for sub in layout.folders))
    files = (f for i, name in enumerate(layout.names)
             for f in _eval_files(cfg, name, i < cfg.comparisons))  # fmt: skip
    return RunPlan(folders, EVAL_FILES, frozenset(files))


def _evaluate_batches(cfg, samples, layout, batches, model, tta, device, world) -> float:
    class_map, prep = model.class_map, model.preprocessing
    opts = DecodeOptions(
        prep=prep,
        class_map=class_map,
        ignore_unknown_codes=cfg.ignore_unknown_codes,
        labels="original",
        keep_original=cfg.comparisons > 0,
        original_limit=cfg.comparisons,  # panels only: no full-size copy of the other images
        extra_sizes=tta.extra_sizes(prep),
        preview_height=THUMBNAIL_HEIGHT,
        hackathon=HACKATHON_SIZE,
    )
    k = class_map.num_classes

    def handle(batch, logits, writer, records) -> None:
        truths = _rows(batch, "labels")
        hack_truths = _rows(batch, "hackathon")
        hack_preds = hackathon_prediction(logits, HACKATHON_SIZE, class_map)
        for j, index in enumerate(batch["index"]):
            truth = torch.as_tensor(truths[j]).to(device, non_blocking=True)
            mine = [part[j : j + 1] for part in logits]
            pred, loss, pixels = predict_and_score(mine, truth[None], tuple(truth.shape))
            pred = pred[0]
            record = {
                "key": samples[index].name,
                "i": index,
                "confusion": confusion_matrix(pred, truth, k).flatten().tolist(),
                "loss": float(loss),
                "pixels": int(pixels),
                "hackathon": hackathon_image_counts(
                    hack_preds[j], torch.as_tensor(hack_truths[j]).to(hack_preds.device)
                ).tolist(),
            }
            pred_np = pred.to(torch.uint8).cpu().numpy()
            original = batch.get("original", [None] * len(truths))[j]
            preview = batch["preview"][j]
            truth_np = truths[j].numpy() if isinstance(truths[j], torch.Tensor) else truths[j]
            writer.submit(
                _write_eval_image,
                cfg,
                samples[index].name,
                layout.names[index],
                pred_np,
                truth_np,
                original,
                preview,
                class_map,
                records,
                record,
            )

    return run_batches(samples, opts, batches, model, tta, cfg, device, handle, "evaluate", world)


def _write_eval_image(
    cfg: EvalConfig,
    key: str,
    name: str,
    pred: np.ndarray,
    truth: np.ndarray,
    original: np.ndarray | None,
    preview: np.ndarray,
    class_map: ClassMap,
    records: RecordLog,
    record: dict,
) -> None:
    """One image's files, announced first, then its record (the image is done only when all
    are written)."""
    records.intend(key, _eval_files(cfg, name, original is not None))
    if cfg.write_masks:
        save_mask(cfg.out / "masks" / name, class_map.ids_to_codes(pred))
        save_color_mask(cfg.out / "masks_color" / name, pred, class_map)
    if original is not None:
        from offroad_seg.reporting.overlays import comparison_panel
        from offroad_seg.reporting.plots import save_png

        panel = comparison_panel(
            original,
            class_map.colorize(truth),
            class_map.colorize(pred),
            class_map,
            title=name,
            ignore=bool((truth == IGNORE_ID).any()),  # a swatch only for what the truth shows
        )
        save_png(cfg.out / "comparisons" / name, panel)
    thumb = make_thumbnail(preview, truth, pred, class_map)
    save_thumbnail(cfg.out / THUMBNAILS / _thumbnail_name(name), thumb)
    records.append(record)


def _thumbnail_name(name: str) -> str:
    """`x.png` -> `x.jpg`, `0003/x.png` -> `0003/x.jpg` (a nested output's folder kept)."""
    return str(PurePosixPath(name).with_suffix(".jpg"))


def split_metrics(
    out: Path, samples: list[Sample], class_map: ClassMap, records: dict[str, dict]
) -> tuple[SegMetrics, HackathonMetrics]:
    """The split's metrics from every image's record (`read_records(out)`), summed in image
    order (so any number of ranks, and a resumed run, give exactly the numbers of one
    uninterrupted process)."""
    missing = [s.name for s in samples if s.name not in records]
    if missing:
        raise OffroadSegError(
            f"{out}: {plural(len(missing), 'image')} have no result ({missing[0]}, ...); "
            "rerun the same command to finish them"
        )
    k = class_map.num_classes
    confusion = np.zeros((k, k), dtype=np.int64)
    loss, pixels = 0.0, 0
    for s in samples:
        r = records[s.name]
        confusion += np.asarray(r["confusion"], dtype=np.int64).reshape(k, k)
        loss += r["loss"]
        pixels += r["pixels"]
    metrics = SegMetrics.from_confusion(
        confusion, class_map.names, loss / pixels if pixels else None
    )
    hackathon = hackathon_scores(
        [s.name for s in samples], [np.asarray(records[s.name]["hackathon"]) for s in samples]
    )
    return metrics, hackathon


def write_eval_outputs(
    cfg: EvalConfig,
    ckpt: HeadCheckpoint,
    samples,
    layout: OutputLayout,
    result: EvalResult,
    identity: dict,
    records: dict[str, dict],
    weights: BackboneSpec,
) -> list[Path]:
    """The split's files: plots, evaluation_metrics.txt, report.html, then metrics.json.
    `weights`: the backbone the engine ran (where its weights came from)."""
    from offroad_seg.reporting.plots import plot_confusion_matrix, plot_per_class_metrics
    from offroad_seg.reporting.provenance import provenance, untrained_banner
    from offroad_seg.reporting.report import write_report

    out, metrics, hackathon = cfg.out, result.metrics, result.hackathon
    name = f"{Path(cfg.head).parent.name}/{Path(cfg.head).name}"
    title = f"{name} on {cfg.data_dir}"
    plot_per_class_metrics(
        metrics.names, metrics.iou, metrics.dice, out / "per_class_metrics.png", title=title
    )
    plot_confusion_matrix(metrics.confusion, metrics.names, out / "confusion_matrix.png")
    settings = {
        "head": str(cfg.head),
        "data": f"{cfg.data_dir} ({plural(len(samples), 'image')})",
        **provenance(ckpt, weights),
        "size": "x".join(str(v) for v in ckpt.preprocessing.size),
        "test-time augmentation": identity["tta"],
        "tool": f"offroad-seg {__version__}",
    }
    banner = untrained_banner(weights)
    header = "".join(f"{k}: {v}\n" for k, v in settings.items())
    if banner:  # first, where nobody reads past it
        header = f"{banner}\n\n{header}"
    text = header + "\n" + metrics.table() + "\n\n" + hackathon.table() + "\n"
    write_text_atomic(out / "evaluation_metrics.txt", text)  # every name here is in EVAL_FILES
    rows = [
        ImageRow(
            name=s.name,
            confusion=np.asarray(records[s.name]["confusion"], dtype=np.int64).reshape(
                len(metrics.names), -1
            ),
            thumbnail=Path(THUMBNAILS) / _thumbnail_name(name),
            comparison=Path("comparisons") / name if i < cfg.comparisons else None,
        )
        for i, (s, name) in enumerate(zip(samples, layout.names, strict=True))
    ]
    # confusion_matrix.png stays a file (for slides) but not in the report: the report's own
    # confusion table shows the same fractions, legible at any class count, counts on hover
    figures = {"Per-class IoU and Dice": Path("per_class_metrics.png")}
    write_report(
        out / "report.html",
        title,
        metrics,
        rows,
        ckpt.class_map,
        settings,
        figures,
        banner=banner,
        hackathon=hackathon,
    )
    report = {
        **metrics.to_dict(),
        "hackathon_protocol": hackathon.to_dict(),
        "images": len(samples),
        "seconds": result.seconds,
        "head": str(ckpt.path),
        "data_dir": str(cfg.data_dir),
        "tta": identity["tta"],
        "engine": identity["engine"],
        "backbone": {**ckpt.backbone.to_dict(), "weights_source": weights.weights_source},
        "preprocessing": ckpt.preprocessing.to_dict(),
        # each image's row of the report: its mIoU, pixel accuracy and IoU per class
        "per_image": {row.name: image_metrics(row, metrics.names).image_summary() for row in rows},
    }
    write_json_atomic(out / "metrics.json", report)  # last: its presence marks a complete run
    names = ("masks", "masks_color", "comparisons", THUMBNAILS, *EVAL_FILES)
    return [out / n for n in names if (out / n).exists()]
