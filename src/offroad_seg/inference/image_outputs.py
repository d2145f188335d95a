"""The files written for one image: the raw-code mask and the colour mask (evaluate and
predict both write them), and predict's files for one image or video frame (mask, colour mask,
overlay with a legend), which `predict.py`'s images and `video.py`'s frames share, and the
class probabilities of `predict --save-probs` (images only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from offroad_seg.core.atomic import atomic_write, write_png_atomic
from offroad_seg.data.classes import ClassMap
from offroad_seg.data.images import mask_image
from offroad_seg.inference.runfolder import RecordLog


def save_mask(path: Path, codes: np.ndarray) -> None:
    write_png_atomic(path, mask_image(codes))


def save_color_mask(path: Path, ids: np.ndarray, class_map: ClassMap) -> None:
    """A paletted PNG: viewers show the class colours, and it encodes ~10x faster than RGB."""
    write_png_atomic(path, class_map.color_image(ids))


PROBS = "probs"


def probs_file(name: str) -> str:
    """An image's probabilities in a predict folder: probs/STEM.npy beside masks/STEM.png
    (`name`: its output name, nested in subfolders as the masks are when there are many)."""
    return f"{PROBS}/{Path(name).with_suffix('.npy').as_posix()}"


def save_probs(path: Path, probs: np.ndarray) -> None:
    """(K, H, W) float16 class probabilities as a .npy file (np.load reads it)."""
    atomic_write(path, lambda f: np.save(f, probs, allow_pickle=False), durable=False)


def predict_files(name: str, overlays: bool, probs: bool = False) -> list[str]:
    """One image's (or video frame's) files in a predict folder (relative paths)."""
    files = [f"masks/{name}", f"masks_color/{name}"] + ([f"overlays/{name}"] if overlays else [])
    return files + ([probs_file(name)] if probs else [])


def write_predicted_image(
    out: Path,
    name: str,
    pred: np.ndarray,
    original: np.ndarray | None,
    class_map: ClassMap,
    records: RecordLog | None,
    record: dict | None,
    probs: np.ndarray | None = None,
) -> None:
    """An image's files, announced first, then its record (a video frame: no announcement or
    record here, `predict_video` makes them). `probs`: its (K, H, W) float16 probabilities."""
    if records is not None:
        files = predict_files(name, original is not None, probs is not None)
        records.intend(record["key"], files)
    if probs is not None:
        save_probs(out / probs_file(name), probs)
    save_mask(out / "masks" / name, class_map.ids_to_codes(pred))
    save_color_mask(out / "masks_color" / name, pred, class_map)
    if original is not None:
        from offroad_seg.reporting.overlays import overlay_with_legend
        from offroad_seg.reporting.plots import save_png

        save_png(
            out / "overlays" / name,
            overlay_with_legend(original, class_map.colorize(pred), class_map),
        )
    if records is not None:
        records.append(record)
