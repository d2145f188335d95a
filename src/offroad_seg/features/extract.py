"""Stage 1: run the frozen backbone once over a dataset and store its features in a cache.

Decoding (and on CPU, resizing) happens in DataLoader workers, the backbone runs in batches,
and finished chunks are compressed and written by a background thread while the next batch
computes. Only whole chunks are written; each batch's chunks are then fsynced together (local
caches: zarr never fsyncs) on another thread and only then marked done, so a rerun of the same
command resumes after a crash, Ctrl-C or a power loss by skipping the finished chunks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from offroad_seg.config import ExtractConfig
from offroad_seg.core import distributed, storage
from offroad_seg.core.background import BoundedPool
from offroad_seg.core.runtime import resolve_device
from offroad_seg.core.storage import CachePath, writer_lock
from offroad_seg.core.text import plural
from offroad_seg.data.classes import ClassMap, resolve_class_map
from offroad_seg.data.dataset import check_headers, list_samples
from offroad_seg.data.digest import sources_digest
from offroad_seg.errors import CacheError, ConfigError, DataError, Interrupted
from offroad_seg.features.cache import FeatureCache
from offroad_seg.features.cache_folder import inspect_target
from offroad_seg.features.cache_format import CacheSpec
from offroad_seg.features.loader import (
    DecodedSamples,
    DecodeOptions,
    default_batch_size,
    default_workers,
    make_loader,
)
from offroad_seg.features.quantize import quantize_int8
from offroad_seg.models.backbone import Backbone, load_backbone
from offroad_seg.models.preprocess import Preprocessing
from offroad_seg.models.variants import get_variant

log = logging.getLogger(__name__)


@dataclass
class ExtractSummary:
    cache: str
    images: int
    extracted: int
    seconds: float
    bytes_on_disk: int
    extra: dict = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        mb = self.bytes_on_disk / 1e6
        per = self.bytes_on_disk / max(1, self.images) / 1e3
        size = f"cache {self.cache}: {mb:.1f} MB ({per:.0f} kB/image)"
        if self.extracted == 0:
            return f"all {plural(self.images, 'image')} were already extracted; {size}"
        return (
            f"extracted {self.extracted} of {plural(self.images, 'image')} in "
            f"{self.seconds:.1f} s ({self.images_per_s:.2f} images/s); {size}"
        )


@dataclass
class _ChunkBuffer:
    features: np.ndarray
    labels: np.ndarray
    scales: np.ndarray | None
    hackathon: np.ndarray | None
    filled: int = 0


class ChunkWriter:
    """Writes whole write units (chunks; shards in format 2) on a background thread and
    commits them in groups on another (`FeatureCache.commit_units`: fsync the group's files,
    then set their `done` flags), so that compressing, writing and syncing all overlap the
    next batch's compute. A group is the units written since the previous `end_group`;
    extract ends one per backbone batch."""

    def __init__(self, cache: FeatureCache, max_in_flight: int = 4) -> None:
        self.cache = cache
        self.writes = BoundedPool(threads=1, max_pending=max_in_flight, name="cache-writer")
        self.commits = BoundedPool(threads=1, max_pending=2, name="cache-commit")
        self._written: list[int] = []  # the open group (touched by the writer thread only)

    def write(
        self,
        unit: int,
        features: np.ndarray,
        labels: np.ndarray,
        scales: np.ndarray | None,
        hackathon: np.ndarray | None = None,
    ) -> None:
        self.writes.submit(self._write, unit, features, labels, scales, hackathon)

    def end_group(self) -> None:
        """Commit the chunks written so far, once their writes are finished."""
        self.writes.submit(self._commit_written)

    def _write(self, unit, features, labels, scales, hackathon) -> None:
        self.cache.write_unit_data(unit, features, labels, scales, hackathon)
        self._written.append(unit)

    def _commit_written(self) -> None:
        group, self._written = self._written, []
        if group:
            self.commits.submit(self.cache.commit_units, group)

    def drain(self) -> None:
        """Wait for every write and commit. Chunks written before a failed write are whole,
        so they are committed too; the first failure is raised."""
        error: BaseException | None = None
        try:
            self.writes.drain()
        except BaseException as e:
            error = e
        try:
            self._commit_written()
            self.commits.drain()
        except BaseException:
            if error is None:
                raise
        if error is not None:
            raise error


class _ChunkAssembler:
    """Collects per-image results until a write unit (a chunk, or a shard in format 2) is
    whole, then writes it in the background. A unit's buffer is allocated when its first
    image arrives, so memory holds the units being filled, not the rank's whole share."""

    def __init__(self, cache: FeatureCache, units: list[int], max_in_flight: int = 4):
        self.cache = cache
        self.buffers: dict[int, _ChunkBuffer | None] = dict.fromkeys(units)
        # a shard is many chunks (~64 MiB of features, more with 266x476 hackathon labels at
        # a small working size): fewer of them queued keeps memory to about three shards
        self.writer = ChunkWriter(cache, max_in_flight if cache.chunks_per_unit == 1 else 1)

    def _buffer(self, unit: int) -> _ChunkBuffer:
        cache = self.cache
        v, (c, h, w) = cache.num_views, cache.spec.feature_shape
        rows, cols = cache.spec.preprocessing.size
        layers = cache.spec.backbone.stored_layers
        start, stop = cache.unit_range(unit)
        n = stop - start
        return _ChunkBuffer(
            np.empty((n, v, c, h, w), dtype=cache.spec.dtype),
            np.empty((n, v, rows, cols), dtype=np.uint8),
            np.empty((n, v, layers, h, w), np.float32) if cache.spec.quantized else None,
            np.empty((n, *cache.hackathon_size), np.uint8) if cache.hackathon_size else None,
        )

    def _unit(self, index: int) -> int:
        return index // (self.cache.images_per_chunk * self.cache.chunks_per_unit)

    def wanted(self, index: int) -> bool:
        return self._unit(index) in self.buffers

    def add(
        self,
        index: int,
        features: np.ndarray,
        labels: np.ndarray,
        scales: np.ndarray | None,
        hackathon: np.ndarray | None,
    ) -> None:
        unit = self._unit(index)
        if unit not in self.buffers:  # a finished chunk that shares a batch with pending ones
            return
        buf = self.buffers[unit]
        if buf is None:
            buf = self.buffers[unit] = self._buffer(unit)
        offset = index - self.cache.unit_range(unit)[0]
        buf.features[offset] = features
        buf.labels[offset] = labels
        if buf.scales is not None:
            buf.scales[offset] = scales
        if buf.hackathon is not None:
            buf.hackathon[offset] = hackathon
        buf.filled += 1
        if buf.filled == len(buf.features):
            del self.buffers[unit]
            self.writer.write(unit, buf.features, buf.labels, buf.scales, buf.hackathon)

    def end_batch(self) -> None:
        """A batch is a group of whole chunks: commit them together (one fsync pass)."""
        self.writer.end_group()

    def drain(self) -> None:
        """Wait for every submitted write and commit (raising the first failure)."""
        self.writer.drain()


def plan_units(cache: FeatureCache, pending: list[int], batch_size: int) -> list[list[list[int]]]:
    """The image indices of each backbone batch, grouped into the units that ranks share out:
    one rank computes and writes a whole unit, so no two ranks ever write one chunk (format
    1) or one shard (format 2). A batch is a fixed group of whole chunks (the batch size
    rounded up to whole chunks, never across a shard), and a unit with any pending chunk is
    recomputed whole, so every image is computed in the same batch whether or not the run was
    resumed: features are then identical to an uninterrupted run even where kernels depend on
    the batch shape (cuBLAS, oneDNN). Format 1's unit is one batch; format 2's a shard."""
    per_batch = max(1, math.ceil(batch_size / cache.images_per_chunk))
    pending_set = set(pending)
    if cache.chunks_per_unit == 1:  # format 1: chunks grouped into batches, a batch per unit
        groups = [
            [range(first, min(first + per_batch, cache.num_chunks))]
            for first in range(0, cache.num_chunks, per_batch)
        ]
    else:
        groups = []
        for unit in range(cache.num_units):
            chunks = cache.unit_chunks(unit)
            groups.append([chunks[i : i + per_batch] for i in range(0, len(chunks), per_batch)])
    units = []
    for group in groups:
        if pending_set.intersection(c for batch in group for c in batch):
            units.append(
                [
                    list(range(cache.chunk_range(b[0])[0], cache.chunk_range(b[-1])[1]))
                    for b in group
                ]
            )
    return units


def working_preprocessing(config: ExtractConfig) -> Preprocessing:
    """The cache's preprocessing: `config.size`, or the backbone family's default size (266x476
    for DINOv2, 272x480 for DINOv3), cut into the backbone's patches."""
    variant = get_variant(config.backbone)
    size = tuple(config.size) if config.size else variant.default_size
    return Preprocessing(size=size, patch_size=variant.patch_size)


def _entries(samples) -> list:
    """(name, image, mask) of each sample: what the sources digest covers."""
    return [(s.name, s.image, s.mask) for s in samples]


def check_block(config: ExtractConfig) -> None:
    """`--block K`: the tokens entering block K (0: the embedded image tokens), so blocks
    K..N-1 remain for training, at least as many as the `--layers` they output."""
    if config.block is None:
        return
    variant = get_variant(config.backbone)
    last = variant.depth - config.layers
    if not 0 <= config.block <= last:
        raise ConfigError(
            f"--block {config.block}: {variant.name} has blocks 0..{variant.depth - 1}; with "
            f"--layers {config.layers} the block must be 0 to {last}"
        )


def build_spec(config: ExtractConfig, backbone: Backbone, samples, class_map: ClassMap):
    return CacheSpec(
        backbone=replace(backbone.spec, block=config.block),
        preprocessing=working_preprocessing(config),
        class_map=class_map,
        names=tuple(s.name for s in samples),
        sources_digest=sources_digest(_entries(samples)),
        views=tuple(config.views),
        dtype=config.dtype,
        images_per_chunk=config.images_per_chunk,
        ignore_unknown_codes=config.ignore_unknown_codes,
        version=config.cache_version,
        chunks_per_shard=config.chunks_per_shard,
    )


def check_target(cache: CachePath, data_dir: Path) -> None:
    """Refuse, before anything is written (the writer lock included), an output that is the
    data folder, lies inside it or holds it, and a non-empty folder that is not a cache of
    ours (`FeatureCache.open_for_writing` checks again under the lock)."""
    path = storage.normalize(cache)
    if not storage.is_remote(path):
        out, data = Path(path).resolve(), Path(data_dir).resolve()
        if out == data or data in out.parents or out in data.parents:
            where = (
                "is the data folder"
                if out == data
                else "is inside the data folder"
                if data in out.parents
                else "holds the data folder"
            )
            raise CacheError(
                f"{path}: the cache folder {where} {data_dir}; choose a folder outside it"
            )
    with storage.remote_errors(path):
        target = inspect_target(path)
    if target.kind == "foreign":
        raise CacheError(target.reason)


def _open_for_writing(config: ExtractConfig, spec: CacheSpec, sources) -> FeatureCache:
    """Create or reopen the cache; a full disk or a vanished mount while creating it is one
    line (a rerun redoes an interrupted creation)."""
    try:
        return FeatureCache.open_for_writing(config.cache, spec, config.overwrite, sources)
    except OSError as e:
        where = e.filename or config.cache
        raise CacheError(
            f"{where}: cannot create the cache ({e.strerror or e}); fix that and rerun the "
            "same command"
        ) from e


def extract(config: ExtractConfig) -> ExtractSummary:
    """Extract (or resume extracting) a dataset split into a feature cache. Under torchrun,
    rank 0 creates or reopens the cache, every rank computes the same plan from the `done`
    flags and takes every K-th batch (whole chunks, so no chunk has two writers), and rank 0
    finalizes once all are done; a cache started with K ranks resumes with any other number."""
    started = time.perf_counter()
    working_preprocessing(config)  # a bad size or backbone fails before any work starts
    check_block(config)
    class_map = resolve_class_map(config.class_map)
    samples = list_samples(config.data_dir)
    check_target(config.cache, config.data_dir)
    check_headers(samples)
    device = resolve_device(config.device)
    with distributed.launched(device) as world:
        device = world.device(device)
        backbone = load_backbone(
            config.weights, layers=config.layers, device=device, name=config.backbone
        )
        spec = build_spec(config, backbone, samples, class_map)
        lock = writer_lock(config.cache) if world.is_main else contextlib.nullcontext()
        with lock:
            if world.is_main:
                cache = _open_for_writing(config, spec, _entries(samples))
            world.barrier()
            if not world.is_main:
                cache = FeatureCache.open(config.cache, mode="r+")
            pending = cache.pending_chunks()
            world.barrier()  # everyone has the same plan before anyone writes
            batch_size = config.batch_size or default_batch_size(device)
            units = plan_units(cache, pending, batch_size)[world.rank :: world.size]
            batches = [batch for unit in units for batch in unit]
            todo = sum(cache.chunk_range(c)[1] - cache.chunk_range(c)[0] for c in pending)
            if world.is_main and todo == 0 and not cache.complete:
                # a finished cache is said once, by the summary line ("all N images were
                # already extracted"); one whose last step was cut off is finished now
                log.info("%s: every chunk is written; finishing the cache", config.cache)
            elif world.is_main and 0 < todo < len(samples):
                log.info("resuming %s: %d of %d images left", config.cache, todo, len(samples))
            compute_start = time.perf_counter()
            try:
                _run(config, cache, backbone, samples, batches, set(pending), device, world)
            except OSError as e:  # disk full, permissions, a vanished mount, ...
                done = int(cache.done().sum())
                raise CacheError(
                    f"{config.cache}: cannot write ({e.strerror or e}); {done} of "
                    f"{len(samples)} images are safely stored; fix that and rerun the same "
                    "command to resume"
                ) from e
            world.barrier()
            seconds = time.perf_counter() - compute_start
            if world.is_main and not cache.complete:
                cache.finalize()
            world.barrier()
            summary = ExtractSummary(
                str(config.cache), len(samples), todo, seconds, cache.bytes_on_disk()
            )
    summary.extra["total_seconds"] = time.perf_counter() - started
    summary.extra["ranks"] = world.size
    return summary


def _run(
    config: ExtractConfig,
    cache: FeatureCache,
    backbone: Backbone,
    samples,
    batches: list[list[int]],
    pending: set[int],
    device: torch.device,
    world: distributed.World,
) -> None:
    """The extraction loop over this rank's batches, writing their pending chunks."""
    spec = cache.spec
    opts = DecodeOptions(
        prep=spec.preprocessing,
        class_map=spec.class_map,
        ignore_unknown_codes=spec.ignore_unknown_codes,
        hackathon=cache.hackathon_size,
    )
    per_unit = cache.images_per_chunk * cache.chunks_per_unit
    mine = sorted(
        u
        for u in {i // per_unit for b in batches for i in b}
        if pending.intersection(cache.unit_chunks(u))
    )
    if not mine:
        return
    workers = default_workers(device) if config.workers is None else config.workers
    loader = make_loader(DecodedSamples(samples, opts), batches, workers, device)
    assembler = _ChunkAssembler(cache, mine)
    todo = sum(cache.unit_range(u)[1] - cache.unit_range(u)[0] for u in mine)
    rank = f" (rank {world.rank} of {world.size})" if world.enabled else ""
    bar = tqdm(
        total=todo,
        unit="img",
        desc=f"extract{rank}",
        disable=None if config.progress and world.is_main else True,
        smoothing=0.1,
    )
    try:
        _encode_and_write(loader, backbone, spec, assembler, bar)
        assembler.drain()
    except KeyboardInterrupt:
        bar.close()
        assembler.drain()
        done = int(cache.done().sum())
        raise Interrupted(
            f"interrupted: {done} of {cache.num_images} images are safely in {config.cache}; "
            "rerun the same command to resume"
        ) from None
    except BaseException:
        bar.close()
        with contextlib.suppress(Exception):  # the original error is the one to report
            assembler.drain()
        raise
    bar.close()


def _encode_and_write(
    loader, backbone: Backbone, spec: CacheSpec, assembler: _ChunkAssembler, bar: tqdm
) -> None:
    """Encode each batch, then hand the one before it to the chunk writer."""
    hflip = "hflip" in spec.views
    dtype = {"float16": torch.float16, "float32": torch.float32}.get(spec.dtype)
    in_flight = None
    for batch in loader:
        if batch["error"] is not None:
            raise DataError(batch["error"])
        feats, scales = _encode(backbone, batch, spec, hflip, dtype)
        # On CUDA the copy to pinned memory is asynchronous: the GPU computes this batch
        # while the previous one is handed to the writer (no host sync in the loop).
        item = (*_to_host(feats, scales), batch)
        if in_flight is not None:
            _hand_over(in_flight, assembler, hflip, bar)
        in_flight = item
    if in_flight is not None:
        _hand_over(in_flight, assembler, hflip, bar)


def _encode(
    backbone: Backbone, batch: dict, spec: CacheSpec, hflip: bool, dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch's features (n, V, C, h, w) as the cache stores them, on the device, with their
    scales for an int8 cache."""
    n = len(batch["index"])
    feats = backbone.encode(batch["image"], spec.preprocessing, hflip, spec.backbone.block)
    # (V*n, C, h, w) -> (n, V, C, h, w): view-major from encode, image-major in the cache
    feats = feats.view(len(spec.views), n, *feats.shape[1:]).transpose(0, 1)
    scales = None
    if spec.quantized:  # on the device: a quarter of the transfer
        feats, scales = quantize_int8(feats, spec.backbone.stored_layers)
    else:
        feats = feats.to(dtype)
    return feats, scales


def _hand_over(item, assembler: _ChunkAssembler, hflip: bool, bar: tqdm) -> None:
    """Hand a computed batch to the chunk writer once its copy to the host is done."""
    (feats, scales), ready, batch = item
    if ready is not None:
        ready.synchronize()
    feats = feats.numpy()
    scales = None if scales is None else scales.numpy()
    labels = batch["labels"].numpy()
    hackathon = batch.get("hackathon")
    new = sum(assembler.wanted(i) for i in batch["index"])
    for j, index in enumerate(batch["index"]):
        views = [labels[j], labels[j][:, ::-1]] if hflip else [labels[j]]
        assembler.add(
            index,
            feats[j],
            np.stack(views),
            None if scales is None else scales[j],
            None if hackathon is None else hackathon[j],
        )
    assembler.end_batch()
    bar.update(new)


def _to_host(
    *tensors: torch.Tensor | None,
) -> tuple[tuple[torch.Tensor | None, ...], torch.cuda.Event | None]:
    """Copies of the tensors in host memory, and on CUDA the event that marks the end of the
    asynchronous copies (recorded on the stream of the tensors' own device: with
    `--device cuda:1` the current stream of GPU 0 would mark nothing)."""
    device = next(t.device for t in tensors if t is not None)
    if device.type != "cuda":
        return tuple(None if t is None else t.contiguous() for t in tensors), None
    hosts = []
    for t in tensors:
        if t is None:
            hosts.append(None)
            continue
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        hosts.append(host)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(device))
    return tuple(hosts), ready
