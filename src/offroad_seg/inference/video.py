"""Prediction on videos: masks of every `frame_stride`-th frame, decoded and batched here,
and an overlay video written whole or not at all. A video is one unit of resuming (redone
whole) and of sharding (ranks take every K-th video).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from offroad_seg.config import PredictConfig
from offroad_seg.core.background import BoundedPool
from offroad_seg.data.classes import ClassMap
from offroad_seg.inference.batches import writer_threads
from offroad_seg.inference.image_outputs import predict_files, write_predicted_image
from offroad_seg.inference.runfolder import RecordLog, read_records
from offroad_seg.models.preprocess import image_to_tensor, resize_image
from offroad_seg.models.upsampling import predict_and_score


def video_key(path: Path) -> str:
    return f"video:{path}"


def predict_video(cfg, video: Path, model, tta, device, world, batch_size: int) -> int:
    """Masks of every `frame_stride`-th frame, and an overlay video of them (written whole or
    not at all); returns the frames done. A video is one unit of resuming: redone whole."""
    from offroad_seg.data.video import frame_name, iter_frames, video_info

    class_map, prep = model.class_map, model.preprocessing
    info = video_info(video)
    key = video_key(video)
    frames = 0
    bar = tqdm(
        total=max(1, -(-info.frames // cfg.frame_stride)),
        unit="frame",
        desc=video.name,
        disable=None if cfg.progress and world.is_main else True,
    )
    writer = BoundedPool(threads=writer_threads(), max_pending=64, name="png-writer")
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
                records.intend(key, [f for n in names for f in predict_files(n, False)])
                for j, f in enumerate(chunk):
                    mine = [part[j : j + 1] for part in logits]
                    pred = predict_and_score(mine, None, f.rgb.shape[:2])[0][0]
                    pred = pred.to(torch.uint8).cpu().numpy()
                    writer.submit(
                        write_predicted_image, cfg.out, names[j], pred, None, class_map, None, None
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


def video_summaries(out: Path, videos: list[Path]) -> list[dict]:
    records = read_records(out)
    summaries = []
    for video in videos:
        record = records.get(video_key(video), {})
        overlay = out / "overlays" / f"{video.stem}.mp4"
        summaries.append(
            {
                "path": str(video),
                "frames": record.get("frames"),
                "overlay": str(overlay) if overlay.exists() else None,
            }
        )
    return summaries
