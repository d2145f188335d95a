"""Prediction: segment images (PNG or JPEG files, folders, globs) and videos with a trained
head.

`predict` writes masks, colour masks and overlays with a legend per image (`image_outputs.py`)
and, with `--save-probs`, its class probabilities (probs/STEM.npy: float16, (K, H, W) at the
image's own size, classes in the head's order); per video frame the same files but the
probabilities, and an overlay video per video (`video.py`); and `predictions.json` last: its
presence means complete. Logits are upsampled (bilinear) to each image's original
size. Batches, resuming and sharding: `batches.py`.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import replace

import torch

from offroad_seg import __version__
from offroad_seg.config import PredictConfig
from offroad_seg.core import distributed
from offroad_seg.core.atomic import write_json_atomic
from offroad_seg.core.runtime import resolve_device
from offroad_seg.data.dataset import Sample
from offroad_seg.data.digest import sources_digest
from offroad_seg.data.inputs import input_warnings, list_inputs
from offroad_seg.data.layout import OutputLayout, output_layout
from offroad_seg.errors import OffroadSegError
from offroad_seg.features.loader import DecodeOptions, default_batch_size
from offroad_seg.inference.batches import EvalResult, named_write_errors, run_batches, start_run
from offroad_seg.inference.engines import build_engine, check_engine_tta, load_head, resolve_engine
from offroad_seg.inference.image_outputs import PROBS, predict_files, write_predicted_image
from offroad_seg.inference.runfolder import RunPlan
from offroad_seg.inference.video import predict_video, video_key, video_summaries
from offroad_seg.models.checkpoint import file_sha256, resolve_head
from offroad_seg.models.segmentation import TTA
from offroad_seg.models.upsampling import predict_and_score, predict_with_probs

log = logging.getLogger(__name__)


PREDICT_FILES = ("predictions.json",)


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
        "save_probs": cfg.save_probs,
        "frame_stride": cfg.frame_stride,
    }


def predict(cfg: PredictConfig) -> EvalResult:
    """Segment images and videos: masks, colour masks, overlays (and overlay videos)."""
    cfg = replace(cfg, head=resolve_head(cfg.head))
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
    layout = output_layout(inputs.images)
    samples = [Sample(layout.key(i, p), p, None) for i, p in enumerate(inputs.images)]
    device = resolve_device(cfg.device)
    with distributed.launched(device) as world:
        device = world.device(device)
        batch_size = cfg.batch_size or default_batch_size(device)
        identity = _predict_identity(cfg, inputs, batch_size, device, tta, prep, engine)
        # the whole model loads before any output exists: one that cannot is refused first
        model = build_engine(engine, ckpt, cfg.weights, device, tta)
        plan = _predict_plan(cfg, inputs, layout)
        records, todo, mine = start_run(cfg, identity, plan, len(samples), batch_size, world)
        videos = [v for v in inputs.videos if video_key(v) not in records]
        my_videos = videos[world.rank :: world.size]
        seconds, frames = 0.0, 0
        with named_write_errors(cfg.out):
            seconds = _predict_batches(cfg, samples, layout, mine, model, tta, device, world)
            for video in my_videos:
                started = time.perf_counter()
                frames += predict_video(cfg, video, model, tta, device, world, batch_size)
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
                    "videos": video_summaries(cfg.out, inputs.videos),
                    "skipped": [str(p) for p in inputs.skipped],
                    "classes": ckpt.class_map.to_dict(),
                    # --save-probs: probs/STEM.npy, float16 (K, H, W), classes as above
                    "probs": PROBS if cfg.save_probs else None,
                    "tta": identity["tta"],
                    "engine": identity["engine"],
                    "seconds": seconds,
                },
            )
        world.barrier()
    return result


def _predict_plan(cfg: PredictConfig, inputs, layout: OutputLayout) -> RunPlan:
    top = ("masks", "masks_color") + (("overlays",) if cfg.overlays else ())
    top += (PROBS,) if cfg.save_probs else ()
    folders = (*top, *(f"{t}/{sub}" for t in top for sub in layout.folders))
    each = (predict_files(name, cfg.overlays, cfg.save_probs) for name in layout.names)
    files = {f for image_files in each for f in image_files}
    files |= {f"overlays/{v.stem}.mp4" for v in inputs.videos if cfg.overlays}
    frames = tuple(  # video.frame_name: STEM_f000123.png
        rf"{folder}/{re.escape(v.stem)}_f\d{{6,}}\.png"
        for v in inputs.videos
        for folder in ("masks", "masks_color")
    )
    return RunPlan(folders, PREDICT_FILES, frozenset(files), frames)


def _predict_batches(cfg, samples, layout, batches, model, tta, device, world) -> float:
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
            size = (int(h), int(w))
            mine = [part[j : j + 1] for part in logits]
            probs = None
            if cfg.save_probs:
                pred, probs = predict_with_probs(mine, size)
                pred, probs = pred[0], probs[0].cpu().numpy()
            else:
                pred = predict_and_score(mine, None, size)[0][0]
            original = batch["original"][j] if cfg.overlays else None
            writer.submit(
                write_predicted_image,
                cfg.out,
                layout.names[index],
                pred.to(torch.uint8).cpu().numpy(),
                original,
                class_map,
                records,
                {"key": samples[index].name, "i": index},
                probs,
            )

    return run_batches(samples, opts, batches, model, tta, cfg, device, handle, "predict", world)
