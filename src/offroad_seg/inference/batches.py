"""The run machinery evaluate and predict share: the run folder a run opens or resumes,
fixed batches of images, and the loop that computes a batch while threads write the last one.

Both commands are resumable and shard their work over torchrun ranks. Images go in fixed
batches (consecutive runs of the sorted inputs, `--batch-size` long); a batch is skipped when
every image in it has a record (see `runfolder.py`) and otherwise computed whole, so each image
is computed in the same batch as in an uninterrupted run, and its outputs are identical. Ranks
take every K-th pending batch (videos: every K-th video). Images go through the same decoding
and `resize_image` as extraction, then `SegmentationModel.tta_logits` (backbone + head, each
test-time augmentation pass). Per-image files are written by a small thread pool while the
next batch computes, then the image's record; at the end, after every rank is done, rank 0
writes the summary files last: `metrics.json` (evaluate) or `predictions.json` (predict),
whose presence means complete.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from offroad_seg.config import EvalConfig, PredictConfig
from offroad_seg.core import distributed
from offroad_seg.core.background import BoundedPool
from offroad_seg.data.dataset import Sample
from offroad_seg.errors import DataError, OffroadSegError
from offroad_seg.features.loader import DecodedSamples, DecodeOptions, default_workers, make_loader
from offroad_seg.inference.runfolder import RecordLog, RunPlan, done_records, prepare_run_folder
from offroad_seg.metrics.confusion import SegMetrics
from offroad_seg.metrics.hackathon import HackathonMetrics
from offroad_seg.models.segmentation import TTA, SegmentationModel


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


def start_run(
    cfg: EvalConfig | PredictConfig,
    identity: dict,
    plan: RunPlan,
    n: int,
    batch_size: int,
    world,
) -> tuple[dict, list[list[int]], list[list[int]]]:
    """Open (or resume) the run folder of `identity`, which will hold `plan`, on rank 0, then
    read what is done: (the done records' keys and indices, the batches of images still to
    do, this rank's share)."""
    if world.is_main:
        prepare_run_folder(cfg.out, identity, cfg.overwrite, plan)
    world.barrier()
    records = done_records(cfg.out)
    done = {i for i in records.values() if i is not None}  # videos' records have no index
    todo = pending_batches(plan_image_batches(n, batch_size), done)
    return records, todo, todo[world.rank :: world.size]


def plan_image_batches(n: int, batch_size: int) -> list[list[int]]:
    """Fixed batches of the sorted inputs: image i is always in batch i // batch_size."""
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def pending_batches(plan: list[list[int]], done: set[int]) -> list[list[int]]:
    """The batches with any image not done (recomputed whole, so outputs are identical)."""
    return [batch for batch in plan if not done.issuperset(batch)]


@contextlib.contextmanager
def named_write_errors(out: Path):
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


def writer_threads() -> int:
    # PNG encoding takes ~10 ms of CPU per image: one thread on a small machine (more would
    # preempt the compute threads), up to 8 where a GPU needs hundreds of images/s written
    return max(1, min(8, (os.cpu_count() or 1) // 2))


def run_batches(
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
    writer = BoundedPool(threads=writer_threads(), max_pending=64, name="png-writer")
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
