"""Evaluation and prediction: full predictions from images, end to end.

Images go through the same `preprocess` and backbone as extraction (`Backbone.encode`), then
the head; logits are upsampled (bilinear) to each image's original size, so what is measured is
what a user would deploy. Metrics come from one confusion matrix over the split. Files are
written by a small thread pool while the next batch computes; the metrics files (evaluate) or
`predictions.json` (predict) are written last and atomically: their presence means the folder
is complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from offroad_seg.atomic import write_json_atomic, write_png_atomic, write_text_atomic
from offroad_seg.background import BoundedPool
from offroad_seg.checkpoint import HeadCheckpoint
from offroad_seg.config import EvalConfig, PredictConfig
from offroad_seg.data import ClassMap, Sample, list_images, list_samples, mask_image
from offroad_seg.engines import build_engine, load_head, resolve_engine
from offroad_seg.errors import DataError, OffroadSegError
from offroad_seg.loader import (
    DecodedSamples,
    DecodeOptions,
    default_batch_size,
    default_workers,
    make_loader,
)
from offroad_seg.loss import predict_and_score
from offroad_seg.metrics import ConfusionAccumulator, SegMetrics
from offroad_seg.model import SegmentationModel, check_tta
from offroad_seg.runtime import resolve_device

log = logging.getLogger(__name__)

EVAL_OUTPUTS = (
    "masks",
    "masks_color",
    "comparisons",
    "evaluation_metrics.txt",
    "metrics.json",
    "per_class_metrics.png",
    "confusion_matrix.png",
)
PREDICT_OUTPUTS = ("masks", "masks_color", "overlays", "predictions.json")


@dataclass
class EvalResult:
    out: Path
    metrics: SegMetrics | None
    images: int
    seconds: float
    files: list[Path] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


# ----------------------------------------------------------------------------- shared


def prepare_output(out: Path, outputs: tuple[str, ...], overwrite: bool) -> None:
    """Refuse a folder that already holds results, unless asked to replace them."""
    existing = [name for name in outputs if (out / name).exists()]
    if existing and not overwrite:
        raise OffroadSegError(
            f"{out}: already holds results ({existing[0]}); use --overwrite to replace them"
        )
    for name in existing:  # start clean so old files never mix with new ones
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _save_mask(path: Path, codes: np.ndarray) -> None:
    write_png_atomic(path, mask_image(codes))


def _save_color_mask(path: Path, ids: np.ndarray, class_map: ClassMap) -> None:
    """A paletted PNG: viewers show the class colours, and it encodes ~10x faster than RGB."""
    write_png_atomic(path, class_map.color_image(ids))


def _save_comparison(path: Path, image, truth, pred, class_map: ClassMap, title: str) -> None:
    from offroad_seg.plots import comparison_panel, save_png

    save_png(path, comparison_panel(image, truth, pred, class_map, title=title))


def _save_overlay(path: Path, image: np.ndarray, pred_rgb: np.ndarray) -> None:
    from offroad_seg.plots import overlay, save_png

    save_png(path, overlay(image, pred_rgb))


# ----------------------------------------------------------------------------- evaluate


def _predict_all(
    samples: list[Sample],
    opts: DecodeOptions,
    model: SegmentationModel,
    settings: EvalConfig | PredictConfig,
    device: torch.device,
    handle,
    desc: str,
) -> float:
    """Decode in workers, predict each batch and pass it to `handle(batch, logits, writer)`,
    whose file writes run on background threads (PIL releases the GIL while compressing) while
    the next batch computes. Returns the seconds taken."""
    workers = default_workers(device) if settings.workers is None else settings.workers
    batch_size = settings.batch_size or default_batch_size(device)
    loader = make_loader(DecodedSamples(samples, opts), batch_size, workers, device)
    # PNG encoding takes ~10 ms of CPU per image: one thread on a small machine (more would
    # preempt the compute threads), up to 8 where a GPU needs hundreds of images/s written
    threads = max(1, min(8, (os.cpu_count() or 1) // 2))
    writer = BoundedPool(threads=threads, max_pending=64, name="png-writer")
    bar = tqdm(
        total=len(samples), unit="img", desc=desc, disable=None if settings.progress else True
    )
    start = time.perf_counter()
    try:
        for batch in loader:
            if batch["error"] is not None:
                raise DataError(batch["error"])
            logits = model.logits(batch["image"], settings.tta)
            handle(batch, logits, writer)
            bar.update(len(batch["index"]))
        writer.drain()
    except BaseException:
        with contextlib.suppress(Exception):  # the original error is the one to report
            writer.drain()
        raise
    finally:
        bar.close()
    return time.perf_counter() - start


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Predict every image of a labelled dataset, write predictions and metrics."""
    check_tta(cfg.tta)
    engine = resolve_engine(cfg.engine, cfg.head, cfg.weights)
    ckpt = load_head(cfg.head)
    class_map = ckpt.class_map
    if cfg.class_map is not None and ClassMap.from_json(cfg.class_map) != class_map:
        raise OffroadSegError(
            f"{cfg.head}: trained with another class map than {cfg.class_map} "
            f"({', '.join(class_map.names)})"
        )
    samples = list_samples(cfg.data_dir)
    prepare_output(cfg.out, EVAL_OUTPUTS, cfg.overwrite)
    device = resolve_device(cfg.device)
    model = build_engine(engine, ckpt, cfg.weights, device)
    opts = DecodeOptions(
        prep=ckpt.preprocessing,
        class_map=class_map,
        ignore_unknown_codes=cfg.ignore_unknown_codes,
        labels="original",
        keep_original=cfg.comparisons > 0,
    )
    acc = ConfusionAccumulator(class_map.num_classes, device)
    for sub in ("masks", "masks_color") if cfg.write_masks else ():
        (cfg.out / sub).mkdir(parents=True, exist_ok=True)

    def handle(batch, logits, writer) -> None:
        labels = batch["labels"]
        # same-size images are scored together; mixed sizes one by one
        groups = (
            [(range(len(batch["index"])), labels)]
            if isinstance(labels, torch.Tensor)
            else [([j], labels[j][None]) for j in range(len(labels))]
        )
        for rows, truth in groups:
            truth = torch.as_tensor(truth).to(device, non_blocking=True)
            pred, loss_sum, count = predict_and_score(
                logits[list(rows)], truth, tuple(truth.shape[-2:])
            )
            acc.add_loss(loss_sum, count)
            acc.update(pred, truth)
            if not (cfg.write_masks or min(batch["index"]) < cfg.comparisons):
                continue
            pred_np = pred.to(torch.uint8).cpu().numpy()  # one copy (and sync) per group
            for k, j in enumerate(rows):
                index = batch["index"][j]
                _write_eval_outputs(
                    cfg, writer, samples[index], index, pred_np[k], truth[k], batch, j, class_map
                )

    seconds = _predict_all(samples, opts, model, cfg, device, handle, "evaluate")
    metrics = acc.compute(class_map.names)
    files = write_metrics(cfg.out, metrics, ckpt, cfg, len(samples), seconds)
    return EvalResult(cfg.out, metrics, len(samples), seconds, files)


def _write_eval_outputs(cfg, writer, sample: Sample, index, pred_np, truth, batch, j, class_map):
    if cfg.write_masks:
        writer.submit(_save_mask, cfg.out / "masks" / sample.name, class_map.ids_to_codes(pred_np))
        writer.submit(_save_color_mask, cfg.out / "masks_color" / sample.name, pred_np, class_map)
    if index < cfg.comparisons:
        pred_rgb = class_map.colorize(pred_np)
        truth_rgb = class_map.colorize(truth.cpu().numpy())
        writer.submit(
            _save_comparison,
            cfg.out / "comparisons" / sample.name,
            batch["original"][j],
            truth_rgb,
            pred_rgb,
            class_map,
            sample.name,
        )


def write_metrics(
    out: Path,
    metrics: SegMetrics,
    ckpt: HeadCheckpoint,
    cfg: EvalConfig,
    images: int,
    seconds: float,
) -> list[Path]:
    from offroad_seg.plots import plot_confusion_matrix, plot_per_class_metrics

    plot_per_class_metrics(metrics.names, metrics.iou, metrics.dice, out / "per_class_metrics.png")
    plot_confusion_matrix(metrics.confusion, metrics.names, out / "confusion_matrix.png")
    header = (
        f"head: {ckpt.path}\ndata: {cfg.data_dir} ({images} images)\n"
        f"test-time augmentation: {cfg.tta}\n\n"
    )
    write_text_atomic(out / "evaluation_metrics.txt", header + metrics.table() + "\n")
    report = {
        **metrics.to_dict(),
        "images": images,
        "seconds": seconds,
        "head": str(ckpt.path),
        "data_dir": str(cfg.data_dir),
        "tta": cfg.tta,
        "engine": resolve_engine(cfg.engine, cfg.head, cfg.weights),
        "backbone": ckpt.backbone.to_dict(),
        "preprocessing": ckpt.preprocessing.to_dict(),
    }
    write_json_atomic(out / "metrics.json", report)  # last: its presence marks a complete run
    return [out / name for name in EVAL_OUTPUTS if (out / name).exists()]


# ----------------------------------------------------------------------------- predict


def predict(cfg: PredictConfig) -> EvalResult:
    """Predict images without masks: masks, colour masks and overlays."""
    check_tta(cfg.tta)
    engine = resolve_engine(cfg.engine, cfg.head, cfg.weights)
    ckpt = load_head(cfg.head)
    class_map = ckpt.class_map
    images = list_images(cfg.inputs)
    seen: dict[str, Path] = {}
    for path in images:
        if path.name in seen:
            raise DataError(f"{path}: same file name as {seen[path.name]}; outputs would collide")
        seen[path.name] = path
    prepare_output(cfg.out, PREDICT_OUTPUTS, cfg.overwrite)
    device = resolve_device(cfg.device)
    model = build_engine(engine, ckpt, cfg.weights, device)
    samples = [Sample(p.name, p, None) for p in images]
    opts = DecodeOptions(
        prep=ckpt.preprocessing,
        class_map=None,
        keep_original=True,
    )
    for sub in ("masks", "masks_color") + (("overlays",) if cfg.overlays else ()):
        (cfg.out / sub).mkdir(parents=True, exist_ok=True)

    def handle(batch, logits, writer) -> None:
        for j, index in enumerate(batch["index"]):
            h, w = batch["size"][j]
            pred = predict_and_score(logits[j : j + 1], None, (h, w))[0][0]
            pred_np = pred.to(torch.uint8).cpu().numpy()
            name = samples[index].name
            writer.submit(_save_mask, cfg.out / "masks" / name, class_map.ids_to_codes(pred_np))
            writer.submit(_save_color_mask, cfg.out / "masks_color" / name, pred_np, class_map)
            if cfg.overlays:
                pred_rgb = class_map.colorize(pred_np)
                writer.submit(
                    _save_overlay, cfg.out / "overlays" / name, batch["original"][j], pred_rgb
                )

    seconds = _predict_all(samples, opts, model, cfg, device, handle, "predict")
    write_json_atomic(
        cfg.out / "predictions.json",
        {
            "head": str(ckpt.path),
            "images": [str(p) for p in images],
            "classes": class_map.to_dict(),
            "tta": cfg.tta,
            "engine": engine,
            "seconds": seconds,
        },
    )
    return EvalResult(cfg.out, None, len(samples), seconds)
