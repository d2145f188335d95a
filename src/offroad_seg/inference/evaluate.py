"""Evaluation and prediction: full predictions from images, end to end, at scale.

`evaluate` scores a labelled dataset: masks, colour masks, comparison panels, thumbnails,
metrics (ours, and the hackathon protocol's for comparison), plots and `report.html`.
`predict` segments images (PNG or JPEG files, folders, globs) and videos: masks, colour masks,
overlays with a legend, and an overlay video per video.

Images go through the same decoding and `resize_image` as extraction, then
`SegmentationModel.tta_logits` (backbone + head, each test-time augmentation pass); logits are
upsampled (bilinear) to each image's original size, so what is measured is what a user would
deploy.

Both commands are resumable and shard their work over torchrun ranks. Images go in fixed
batches (consecutive runs of the sorted inputs, `--batch-size` long); a batch is skipped when
every image in it has a record (see `runfolder.py`) and otherwise computed whole, so each image
is computed in the same batch as in an uninterrupted run, and its outputs are identical. Ranks
take every K-th pending batch (videos: every K-th video). Per-image files are written by a
small thread pool while the next batch computes, then the image's record; at the end, after
every rank is done, rank 0 computes the metrics from all records in image order (the summed
confusion matrices: equal to one process's exactly) and writes the summary files last:
`metrics.json` (evaluate) or `predictions.json` (predict), whose presence means complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from offroad_seg import __version__
from offroad_seg.config import EvalConfig, PredictConfig
from offroad_seg.core import distributed
from offroad_seg.core.atomic import write_json_atomic, write_png_atomic, write_text_atomic
from offroad_seg.core.background import BoundedPool
from offroad_seg.core.runtime import resolve_device
from offroad_seg.core.text import plural
from offroad_seg.data.classes import ClassMap, resolve_class_map
from offroad_seg.data.dataset import Sample, check_headers, list_samples, output_name
from offroad_seg.data.digest import sources_digest
from offroad_seg.data.images import mask_image
from offroad_seg.data.inputs import input_warnings, list_inputs
from offroad_seg.errors import DataError, OffroadSegError
from offroad_seg.features.loader import (
    DecodedSamples,
    DecodeOptions,
    default_batch_size,
    default_workers,
    make_loader,
)
from offroad_seg.inference.engines import build_engine, check_engine_tta, load_head, resolve_engine
from offroad_seg.inference.runfolder import RecordLog, RunPlan, prepare_run_folder, read_records
from offroad_seg.metrics.confusion import SegMetrics, confusion_matrix
from offroad_seg.metrics.hackathon import (
    HackathonMetrics,
    hackathon_image_counts,
    hackathon_prediction,
    hackathon_scores,
)
from offroad_seg.models.checkpoint import HeadCheckpoint, file_sha256
from offroad_seg.models.preprocess import image_to_tensor, resize_image
from offroad_seg.models.segmentation import TTA, SegmentationModel
from offroad_seg.models.upsampling import predict_and_score
from offroad_seg.reporting.report import THUMBNAIL_HEIGHT, ImageRow, make_thumbnail, save_thumbnail

log = logging.getLogger(__name__)

THUMBNAILS = "thumbnails"
# evaluate's run-level files, in the order written: metrics.json last marks a complete run
EVAL_FILES = ("per_class_metrics.png", "confusion_matrix.png", "evaluation_metrics.txt",
              "report.html", "metrics.json")  # fmt: skip
PREDICT_FILES = ("predictions.json",)


@dataclass
class EvalResult:
    out: Path
    metrics: SegMetrics | None
    images: int  # in the run
    seconds: float  # this session's computing
    files: list[Path] = field(default_factory=list)
    computed: int = 0  # images computed by this session (all of them, unless resumed)
    hackathon: HackathonMetrics | None = None
    videos: int = 0
    frames: int = 0

    @property
    def images_per_s(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


# ----------------------------------------------------------------------------- shared


def _start_run(
    cfg: EvalConfig | PredictConfig,
    identity: dict,
    plan: RunPlan,
    n: int,
    batch_size: int,
    world,
) -> tuple[dict, list[list[int]], list[list[int]]]:
    """Open (or resume) the run folder of `identity`, which will hold `plan`, on rank 0, then
    read what is done: (the records, the batches of images still to do, this rank's share)."""
    if world.is_main:
        prepare_run_folder(cfg.out, identity, cfg.overwrite, plan)
    world.barrier()
    records = read_records(cfg.out)
    done = {r["i"] for r in records.values() if "i" in r}  # videos' records have no index
    todo = pending_batches(plan_batches(n, batch_size), done)
    return records, todo, todo[world.rank :: world.size]


def plan_batches(n: int, batch_size: int) -> list[list[int]]:
    """Fixed batches of the sorted inputs: image i is always in batch i // batch_size."""
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def pending_batches(plan: list[list[int]], done: set[int]) -> list[list[int]]:
    """The batches with any image not done (recomputed whole, so outputs are identical)."""
    return [batch for batch in plan if not done.issuperset(batch)]


def _save_mask(path: Path, codes: np.ndarray) -> None:
    write_png_atomic(path, mask_image(codes))


def _save_color_mask(path: Path, ids: np.ndarray, class_map: ClassMap) -> None:
    """A paletted PNG: viewers show the class colours, and it encodes ~10x faster than RGB."""
    write_png_atomic(path, class_map.color_image(ids))


@contextlib.contextmanager
def _named_write_errors(out: Path):
    """An OSError while computing and writing (disk full, a vanished mount, ...) as one line
    naming the file (`atomic_write` and `RecordLog` name it) and what to do: whatever is done
    is kept, and the same command resumes."""
    try:
        yield
    except OSError as e:
        if e.errno is None:
            raise
        raise OffroadSegError(
            f"{e.filename or out}: {e.strerror}; the images done so far are kept: fix that and "
            "rerun the same command to resume"
        ) from e


def _writer_threads() -> int:
    # PNG encoding takes ~10 ms of CPU per image: one thread on a small machine (more would
    # preempt the compute threads), up to 8 where a GPU needs hundreds of images/s written
    return max(1, min(8, (os.cpu_count() or 1) // 2))


def _run_batches(
    samples: list[Sample],
    opts: DecodeOptions,
    batches: list[list[int]],
    model: SegmentationModel,
    tta: TTA,
    settings: EvalConfig | PredictConfig,
    device: torch.device,
    handle,
    desc: str,
    world: distributed.World,
) -> float:
    """Decode this rank's batches in workers, compute each one's logits and pass them to
    `handle(batch, logits, writer, records)`, whose file writes run on background threads (PIL
    releases the GIL while compressing) while the next batch computes, each image's record
    appended after its files. Returns the seconds."""
    if not batches:
        return 0.0
    records = RecordLog(settings.out, world.rank)
    workers = default_workers(device) if settings.workers is None else settings.workers
    loader = make_loader(DecodedSamples(samples, opts), batches, workers, device)
    writer = BoundedPool(threads=_writer_threads(), max_pending=64, name="png-writer")
    bar = tqdm(
        total=sum(len(b) for b in batches),
        unit="img",
        desc=desc,
        disable=None if settings.progress and world.is_main else True,
    )
    start = time.perf_counter()
    try:
        for batch in loader:
            if batch["error"] is not None:
                raise DataError(batch["error"])
            logits = model.tta_logits(batch["image"], batch.get("scaled", []), tta)
            handle(batch, logits, writer, records)
            bar.update(len(batch["index"]))
        writer.drain()
    except BaseException:
        with contextlib.suppress(Exception):  # the original error is the one to report
            writer.drain()
        raise
    finally:
        bar.close()
        records.close()
    return time.perf_counter() - start


def _rows(batch: dict, key: str) -> list:
    """A batch field as one entry per image (stacked tensors or lists)."""
    value = batch[key]
    return list(value) if isinstance(value, torch.Tensor) else value


# ----------------------------------------------------------------------------- evaluate


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


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Predict every image of a labelled dataset; write predictions, metrics and a report."""
    tta = TTA.of(cfg.tta, cfg.tta_scales)
    engine = resolve_engine(cfg.engine, cfg.head, cfg.weights)
    ckpt = load_head(cfg.head)
    check_engine_tta(cfg.head, ckpt, tta)
    class_map = ckpt.class_map
    if cfg.class_map is not None and resolve_class_map(cfg.class_map) != class_map:
        raise OffroadSegError(
            f"{cfg.head}: trained with another class map than {cfg.class_map} "
            f"({', '.join(class_map.names)})"
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
        plan = _eval_plan(cfg, samples)
        records, todo, mine = _start_run(cfg, identity, plan, len(samples), batch_size, world)
        if world.is_main and records and todo:
            log.info("resuming %s: %s left", cfg.out, plural(sum(map(len, todo)), "image"))
        seconds = 0.0
        with _named_write_errors(cfg.out):
            if mine:
                seconds = _evaluate_batches(cfg, samples, mine, model, tta, device, world)
            world.barrier()
            done = sum(map(len, todo))
            result = EvalResult(cfg.out, None, len(samples), seconds, computed=done)
            if world.is_main:
                result.metrics, result.hackathon = split_metrics(cfg.out, samples, class_map)
                result.files = write_eval_outputs(cfg, ckpt, samples, result, identity)
        world.barrier()
    return result


def _eval_files(cfg: EvalConfig, sample: Sample, comparison: bool) -> list[str]:
    """One image's files in an evaluate folder (relative paths)."""
    name = sample.output_name
    files = [f"masks/{name}", f"masks_color/{name}"] if cfg.write_masks else []
    files += [f"comparisons/{name}"] if comparison else []
    return [*files, f"{THUMBNAILS}/{_thumbnail_name(name)}"]


def _eval_plan(cfg: EvalConfig, samples: list[Sample]) -> RunPlan:
    folders = ("masks", "masks_color") if cfg.write_masks else ()
    folders += ("comparisons",) if cfg.comparisons > 0 else ()
    files = (f for i, s in enumerate(samples) for f in _eval_files(cfg, s, i < cfg.comparisons))
    return RunPlan((*folders, THUMBNAILS), EVAL_FILES, frozenset(files))


def _evaluate_batches(cfg, samples, batches, model, tta, device, world) -> float:
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
        hackathon=True,
    )
    k = class_map.num_classes

    def handle(batch, logits, writer, records) -> None:
        truths = _rows(batch, "labels")
        hack_truths = _rows(batch, "hackathon")
        hack_preds = hackathon_prediction(logits, prep.size, class_map)
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
                samples[index],
                pred_np,
                truth_np,
                original,
                preview,
                class_map,
                records,
                record,
            )

    return _run_batches(samples, opts, batches, model, tta, cfg, device, handle, "evaluate", world)


def _write_eval_image(
    cfg: EvalConfig,
    sample: Sample,
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
    records.intend(sample.name, _eval_files(cfg, sample, original is not None))
    name = sample.output_name
    if cfg.write_masks:
        _save_mask(cfg.out / "masks" / name, class_map.ids_to_codes(pred))
        _save_color_mask(cfg.out / "masks_color" / name, pred, class_map)
    if original is not None:
        from offroad_seg.reporting.overlays import comparison_panel
        from offroad_seg.reporting.plots import save_png

        panel = comparison_panel(
            original, class_map.colorize(truth), class_map.colorize(pred), class_map, title=name
        )
        save_png(cfg.out / "comparisons" / name, panel)
    thumb = make_thumbnail(preview, truth, pred, class_map)
    save_thumbnail(cfg.out / THUMBNAILS / _thumbnail_name(name), thumb)
    records.append(record)


def _thumbnail_name(name: str) -> str:
    return f"{Path(name).stem}.jpg"


def split_metrics(
    out: Path, samples: list[Sample], class_map: ClassMap
) -> tuple[SegMetrics, HackathonMetrics]:
    """The split's metrics from every image's record, summed in image order (so any number of
    ranks, and a resumed run, give exactly the numbers of one uninterrupted process)."""
    records = read_records(out)
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
    cfg: EvalConfig, ckpt: HeadCheckpoint, samples, result: EvalResult, identity: dict
) -> list[Path]:
    """The split's files: plots, evaluation_metrics.txt, report.html, then metrics.json."""
    from offroad_seg.reporting.plots import plot_confusion_matrix, plot_per_class_metrics
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
        "backbone": ckpt.backbone.describe(),
        "size": "x".join(str(v) for v in ckpt.preprocessing.size),
        "test-time augmentation": identity["tta"],
        "tool": f"offroad-seg {__version__}",
    }
    header = "".join(f"{k}: {v}\n" for k, v in settings.items())
    text = header + "\n" + metrics.table() + "\n\n" + hackathon.table() + "\n"
    write_text_atomic(out / "evaluation_metrics.txt", text)  # every name here is in EVAL_FILES
    records = read_records(out)
    rows = [
        ImageRow(
            name=s.name,
            confusion=np.asarray(records[s.name]["confusion"], dtype=np.int64).reshape(
                len(metrics.names), -1
            ),
            thumbnail=Path(THUMBNAILS) / _thumbnail_name(s.output_name),
            comparison=Path("comparisons") / s.output_name if i < cfg.comparisons else None,
        )
        for i, s in enumerate(samples)
    ]
    figures = {
        "Per-class IoU and Dice": Path("per_class_metrics.png"),
        "Confusion matrix": Path("confusion_matrix.png"),
    }
    write_report(out / "report.html", title, metrics, rows, ckpt.class_map, settings, figures)
    report = {
        **metrics.to_dict(),
        "hackathon_protocol": hackathon.to_dict(),
        "images": len(samples),
        "seconds": result.seconds,
        "head": str(ckpt.path),
        "data_dir": str(cfg.data_dir),
        "tta": identity["tta"],
        "engine": identity["engine"],
        "backbone": ckpt.backbone.to_dict(),
        "preprocessing": ckpt.preprocessing.to_dict(),
    }
    write_json_atomic(out / "metrics.json", report)  # last: its presence marks a complete run
    names = ("masks", "masks_color", "comparisons", THUMBNAILS, *EVAL_FILES)
    return [out / n for n in names if (out / n).exists()]


# ----------------------------------------------------------------------------- predict


def _predict_identity(cfg: PredictConfig, inputs, batch_size, device, tta, prep, engine) -> dict:
    return {
        "command": "predict",
        "tool_version": __version__,
        "head": str(cfg.head),
        "head_sha256": file_sha256(cfg.head),
        "images": sources_digest([(p.name, p, None) for p in inputs.images]),
        "videos": [str(v) for v in inputs.videos],
        "tta": tta.describe(prep),
        "engine": engine,
        "batch_size": batch_size,
        "device": device.type,
        "overlays": cfg.overlays,
        "frame_stride": cfg.frame_stride,
    }


def predict(cfg: PredictConfig) -> EvalResult:
    """Segment images and videos: masks, colour masks, overlays (and overlay videos)."""
    tta = TTA.of(cfg.tta, cfg.tta_scales)
    if cfg.frame_stride < 1:
        raise OffroadSegError(f"frame stride {cfg.frame_stride}: must be at least 1")
    engine = resolve_engine(cfg.engine, cfg.head, cfg.weights)
    ckpt = load_head(cfg.head)
    check_engine_tta(cfg.head, ckpt, tta)
    prep = ckpt.preprocessing
    inputs = list_inputs(cfg.inputs)
    if inputs.skipped:
        log.warning(inputs.skipped_note())
    for warning in input_warnings([*inputs.images, *inputs.videos], prep.size):
        log.warning(warning)
    samples = [Sample(p.name, p, None) for p in inputs.images]
    device = resolve_device(cfg.device)
    with distributed.launched(device) as world:
        device = world.device(device)
        batch_size = cfg.batch_size or default_batch_size(device)
        identity = _predict_identity(cfg, inputs, batch_size, device, tta, prep, engine)
        # the whole model loads before any output exists: one that cannot is refused first
        model = build_engine(engine, ckpt, cfg.weights, device, tta)
        plan = _predict_plan(cfg, inputs)
        records, todo, mine = _start_run(cfg, identity, plan, len(samples), batch_size, world)
        videos = [v for v in inputs.videos if _video_key(v) not in records]
        my_videos = videos[world.rank :: world.size]
        seconds, frames = 0.0, 0
        with _named_write_errors(cfg.out):
            seconds = _predict_batches(cfg, samples, mine, model, tta, device, world)
            for video in my_videos:
                started = time.perf_counter()
                frames += _predict_video(cfg, video, model, tta, device, world, batch_size)
                seconds += time.perf_counter() - started
        if world.enabled:
            frames = int(world.all_reduce_sum(torch.tensor(frames)).item())
        world.barrier()
        computed = sum(map(len, todo))
        result = EvalResult(cfg.out, None, len(samples), seconds, computed=computed)
        result.videos, result.frames = len(inputs.videos), frames
        if world.is_main:
            write_json_atomic(  # in PREDICT_FILES
                cfg.out / "predictions.json",
                {
                    "head": str(ckpt.path),
                    "images": [str(p) for p in inputs.images],
                    "videos": _video_summaries(cfg.out, inputs.videos),
                    "skipped": [str(p) for p in inputs.skipped],
                    "classes": ckpt.class_map.to_dict(),
                    "tta": identity["tta"],
                    "engine": identity["engine"],
                    "seconds": seconds,
                },
            )
        world.barrier()
    return result


def _predict_files(name: str, overlays: bool) -> list[str]:
    """One image's (or video frame's) files in a predict folder (relative paths)."""
    return [f"masks/{name}", f"masks_color/{name}"] + ([f"overlays/{name}"] if overlays else [])


def _predict_plan(cfg: PredictConfig, inputs) -> RunPlan:
    folders = ("masks", "masks_color") + (("overlays",) if cfg.overlays else ())
    files = {f for p in inputs.images for f in _predict_files(output_name(p), cfg.overlays)}
    files |= {f"overlays/{v.stem}.mp4" for v in inputs.videos if cfg.overlays}
    frames = tuple(  # video.frame_name: STEM_f000123.png
        rf"{folder}/{re.escape(v.stem)}_f\d{{6,}}\.png"
        for v in inputs.videos
        for folder in ("masks", "masks_color")
    )
    return RunPlan(folders, PREDICT_FILES, frozenset(files), frames)


def _predict_batches(cfg, samples, batches, model, tta, device, world) -> float:
    class_map, prep = model.class_map, model.preprocessing
    opts = DecodeOptions(
        prep=prep,
        class_map=None,
        keep_original=cfg.overlays,
        extra_sizes=tta.extra_sizes(prep),
    )

    def handle(batch, logits, writer, records) -> None:
        for j, index in enumerate(batch["index"]):
            h, w = batch["size"][j]
            pred = predict_and_score([part[j : j + 1] for part in logits], None, (h, w))[0][0]
            original = batch["original"][j] if cfg.overlays else None
            writer.submit(
                _write_predicted_image,
                cfg.out,
                samples[index].output_name,
                pred.to(torch.uint8).cpu().numpy(),
                original,
                class_map,
                records,
                {"key": samples[index].name, "i": index},
            )

    return _run_batches(samples, opts, batches, model, tta, cfg, device, handle, "predict", world)


def _write_predicted_image(
    out: Path,
    name: str,
    pred: np.ndarray,
    original: np.ndarray | None,
    class_map: ClassMap,
    records: RecordLog | None,
    record: dict | None,
) -> None:
    """An image's files, announced first, then its record (a video frame: no announcement or
    record here, `_predict_video` makes them)."""
    if records is not None:
        records.intend(record["key"], _predict_files(name, original is not None))
    _save_mask(out / "masks" / name, class_map.ids_to_codes(pred))
    _save_color_mask(out / "masks_color" / name, pred, class_map)
    if original is not None:
        from offroad_seg.reporting.overlays import overlay_with_legend
        from offroad_seg.reporting.plots import save_png

        save_png(
            out / "overlays" / name,
            overlay_with_legend(original, class_map.colorize(pred), class_map),
        )
    if records is not None:
        records.append(record)


def _video_key(path: Path) -> str:
    return f"video:{path}"


def _predict_video(cfg, video: Path, model, tta, device, world, batch_size: int) -> int:
    """Masks of every `frame_stride`-th frame, and an overlay video of them (written whole or
    not at all); returns the frames done. A video is one unit of resuming: redone whole."""
    from offroad_seg.data.video import frame_name, iter_frames, video_info

    class_map, prep = model.class_map, model.preprocessing
    info = video_info(video)
    key = _video_key(video)
    frames = 0
    bar = tqdm(
        total=max(1, -(-info.frames // cfg.frame_stride)),
        unit="frame",
        desc=video.name,
        disable=None if cfg.progress and world.is_main else True,
    )
    writer = BoundedPool(threads=_writer_threads(), max_pending=64, name="png-writer")
    records = RecordLog(cfg.out, world.rank)
    with contextlib.ExitStack() as stack:
        stack.callback(records.close)
        stack.callback(bar.close)
        if cfg.overlays:
            records.intend(key, [f"overlays/{video.stem}.mp4"])
        movie = _OverlayMovie(cfg.out / "overlays" / f"{video.stem}.mp4", info.fps, cfg, stack)
        try:
            for chunk in _chunks(iter_frames(video, cfg.frame_stride), batch_size):
                images = [image_to_tensor(f.rgb) for f in chunk]
                resized = torch.cat([resize_image(i, prep) for i in images])
                scaled = [
                    torch.cat([resize_image(i, replace(prep, size=size)) for i in images])
                    for size in tta.extra_sizes(prep)
                ]
                logits = model.tta_logits(resized, scaled, tta)
                names = [frame_name(video, f.index, info.frames) for f in chunk]
                records.intend(key, [f for n in names for f in _predict_files(n, False)])
                for j, f in enumerate(chunk):
                    mine = [part[j : j + 1] for part in logits]
                    pred = predict_and_score(mine, None, f.rgb.shape[:2])[0][0]
                    pred = pred.to(torch.uint8).cpu().numpy()
                    writer.submit(
                        _write_predicted_image, cfg.out, names[j], pred, None, class_map, None, None
                    )
                    movie.add(f.rgb, pred, class_map)
                    frames += 1
                    bar.update(1)
        finally:
            writer.drain()
    records = RecordLog(cfg.out, world.rank)  # after the movie is in place (the stack's end)
    records.append({"key": key, "frames": frames})
    records.close()
    return frames


class _OverlayMovie:
    """The overlay video of a prediction, opened at its first frame (its size is known then)
    and closed with the stack: kept when the stack ends normally, removed on an error."""

    def __init__(self, path: Path, fps: float, cfg: PredictConfig, stack) -> None:
        self.path, self.fps = path, fps / cfg.frame_stride
        self.enabled, self.stack = cfg.overlays, stack
        self.writer = None

    def add(self, rgb: np.ndarray, pred: np.ndarray, class_map: ClassMap) -> None:
        if not self.enabled:
            return
        from offroad_seg.data.video import VideoWriter
        from offroad_seg.reporting.overlays import overlay_with_legend

        picture = overlay_with_legend(rgb, class_map.colorize(pred), class_map)
        if self.writer is None:
            height, width = picture.shape[:2]
            self.writer = self.stack.enter_context(VideoWriter(self.path, self.fps, width, height))
        self.writer.write(picture)


def _chunks(items, size: int):
    """Lists of up to `size` consecutive items."""
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _video_summaries(out: Path, videos: list[Path]) -> list[dict]:
    records = read_records(out)
    summaries = []
    for video in videos:
        record = records.get(_video_key(video), {})
        overlay = out / "overlays" / f"{video.stem}.mp4"
        summaries.append(
            {
                "path": str(video),
                "frames": record.get("frames"),
                "overlay": str(overlay) if overlay.exists() else None,
            }
        )
    return summaries
