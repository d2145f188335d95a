"""The one-command demo: synthetic data -> extract -> train -> evaluate.

It uses real DINOv2 weights when they resolve without a download, and otherwise an untrained
backbone, which it announces loudly: its numbers then say the pipeline works, not how good
DINOv2 is.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from offroad_seg.config import DEFAULT_BACKBONE, DemoConfig, EvalConfig, ExtractConfig, TrainConfig
from offroad_seg.data.synthetic import SynthConfig, synthesize
from offroad_seg.errors import OffroadSegError, WeightsError
from offroad_seg.features.extract import extract
from offroad_seg.inference.batches import EvalResult
from offroad_seg.inference.evaluate import evaluate
from offroad_seg.models.heads import get_head_spec
from offroad_seg.models.variants import get_variant
from offroad_seg.models.weights import RANDOM, find_weights
from offroad_seg.training.loop import train

log = logging.getLogger(__name__)

MARKER = ".offroad-seg-demo"
UNTRAINED_BANNER = (
    "NOTE: no pretrained DINOv2 weights were found offline, so this demo runs an UNTRAINED "
    "(random) backbone. Its metrics show that the pipeline works end to end, not what DINOv2 "
    "features achieve. Supply real weights with --weights PATH or $OFFROAD_SEG_WEIGHTS."
)


@dataclass
class DemoResult:
    out: Path
    weights: str
    evaluation: EvalResult
    stage_lines: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _prepare(out: Path) -> None:
    """The demo owns its folder: reuse one it made, refuse anything else that is not empty."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise OffroadSegError(f"{out}: not empty and not a demo folder; pass another --out")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by `offroad-seg demo`; safe to delete\n")


def demo(cfg: DemoConfig, say: Callable[[str], None] = log.info) -> DemoResult:
    """Run every stage on synthetic scenes; `say` receives each stage's summary line."""
    started = time.perf_counter()
    head = get_head_spec(cfg.head).name  # an unknown head is refused before any work
    _prepare(cfg.out)  # a folder it may not use is refused before anything is said
    weights = cfg.weights
    if weights is None:
        try:
            weights = find_weights("auto", get_variant(DEFAULT_BACKBONE), allow_download=False)
        except WeightsError:
            weights = RANDOM
    if weights == RANDOM:
        say(UNTRAINED_BANNER)
    data, caches, run = cfg.out / "data", cfg.out / "cache", cfg.out / "head"
    lines: list[str] = []

    def stage(line: str) -> None:
        lines.append(line)
        say(line)

    t = time.perf_counter()
    synthesize(SynthConfig(data, cfg.train, cfg.val, cfg.seed, cfg.width, cfg.height))
    stage(
        f"[1/4] synth: {cfg.train} train + {cfg.val} val scenes ({cfg.width}x{cfg.height}) "
        f"in {time.perf_counter() - t:.1f} s -> {data}"
    )
    common = dict(weights=weights, size=cfg.size, progress=cfg.progress)
    train_x = extract(
        ExtractConfig(data / "train", caches / "train.zarr", views=("identity", "hflip"), **common)
    )
    val_x = extract(ExtractConfig(data / "val", caches / "val.zarr", **common))
    stage(f"[2/4] {train_x.line()}")
    stage(f"[2/4] {val_x.line()}")
    result = train(
        TrainConfig(
            caches=(caches / "train.zarr",),
            out=run,
            val_cache=caches / "val.zarr",
            head=head,
            epochs=cfg.epochs,
            seed=cfg.seed,
            progress=cfg.progress,
        )
    )
    best = result.best or {}
    stage(
        f"[3/4] train {head}: {len(result.history)} epochs in {result.seconds:.1f} s "
        f"({result.seconds / len(result.history):.2f} s/epoch); best val mIoU "
        f"{best.get('val_miou', float('nan')):.4f} at epoch {best.get('epoch')}"
    )
    evaluation = evaluate(
        EvalConfig(
            head=run,  # a run folder: its segmentation_head.pth
            data_dir=data / "val",
            out=cfg.out / "predictions",
            weights=weights,
            comparisons=cfg.val,
            progress=cfg.progress,
        )
    )
    stage(
        f"[4/4] evaluate: {evaluation.images} images in {evaluation.seconds:.1f} s "
        f"({evaluation.images_per_s:.2f} images/s)"
    )
    return DemoResult(cfg.out, weights, evaluation, lines, time.perf_counter() - started)
