"""Feature sources for head training: cached features in memory, or streamed from zarr.

In memory, an epoch's global sample order (a pure function of seed and epoch) is cut into
global batches of `batch_size`; under DDP each rank takes its contiguous slice of every global
batch, and with the loss normalised by the global pixel weight (see `train_one_epoch`) K ranks
compute exactly the gradient one process computes for the global batch. Streamed, each rank
reads its own part of the epoch (its own shards) through a shuffle buffer, in batches of the
same sizes: every image is still used once per epoch, but a global batch is no longer the one
a single process would draw (reading every shard on every rank would multiply the reads by K).

Caches of several working sizes train together (scale augmentation), but a batch never mixes
sizes: `size_batches` groups the epoch order by size (see there; with one size it is the plain
cut into consecutive batches, so one-size training is unchanged).

A source is built once and can feed any number of trainings (a sweep trains many heads on
the features it loaded). Features stay in the cache's storage type (float16, or int8 with
per-token scales) until a batch is taken, and are made float32 on the training device.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from offroad_seg.core.distributed import SINGLE, World
from offroad_seg.core.text import plural
from offroad_seg.errors import ConfigError
from offroad_seg.features.cache import FeatureCache
from offroad_seg.features.cache_format import StoredFeatures
from offroad_seg.features.quantize import dequantize

log = logging.getLogger(__name__)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The one source of an epoch's randomness in sample order and view choice."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def epoch_order(
    num_views: torch.Tensor, seed: int, epoch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of an epoch in training order and the cached view used for each: a pure
    function of (seed, epoch), shared by both feature sources, resume and tests."""
    g = epoch_generator(seed, epoch)
    perm = torch.randperm(len(num_views), generator=g)
    views = (torch.rand(len(num_views), generator=g) * num_views[perm]).long()
    return perm, views


def rank_slices(n: int, batch_size: int, world: World) -> list[slice]:
    """This rank's positions in the epoch order, one slice per global batch. Under DDP a last
    batch smaller than the world is dropped (every rank must take a step)."""
    out = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if world.enabled and stop - start < world.size:
            break
        bounds = np.linspace(start, stop, world.size + 1).round().astype(int)
        out.append(slice(bounds[world.rank], bounds[world.rank + 1]))
    return out


def size_batches(groups: np.ndarray, batch_size: int, world: World = SINGLE) -> list[np.ndarray]:
    """This rank's positions in an epoch's order, one array per global batch, for samples whose
    size group (`groups`, per position) a batch must not mix. Walking the order, each group fills
    a batch of its own, taken when full (batches in the order they fill up, so the sizes
    interleave as the shuffled order does, and the order's randomness is the only one); each
    group's part-filled last batch follows at the end, in group order. Every sample is in one
    batch. One group: the consecutive runs of `batch_size` of `rank_slices`. Under DDP each rank
    takes its slice of every global batch, and a global batch smaller than the world is
    dropped."""
    groups = np.asarray(groups)
    n = len(groups)
    keyed = []
    for g in np.unique(groups):
        positions = np.flatnonzero(groups == g)
        for start in range(0, len(positions), batch_size):
            batch = positions[start : start + batch_size]
            full = len(batch) == batch_size
            keyed.append((int(batch[-1]) if full else n + int(g), batch))
    keyed.sort(key=lambda item: item[0])
    out = []
    for _, batch in keyed:
        part = rank_slices(len(batch), len(batch), world)
        if part:
            out.append(batch[part[0]])
    return out


def batch_count(group_sizes: Sequence[int], batch_size: int, world: World = SINGLE) -> int:
    """Steps per epoch of `size_batches` for groups of these sizes (the same every epoch)."""
    return sum(len(rank_slices(n, batch_size, world)) for n in group_sizes)


def size_groups(caches: Sequence[FeatureCache]) -> np.ndarray:
    """Each cache's size group: 0, 1, ... by working size, in order of first appearance."""
    sizes = list(dict.fromkeys(tuple(c.spec.preprocessing.size) for c in caches))
    return np.array([sizes.index(tuple(c.spec.preprocessing.size)) for c in caches])


@dataclass
class FeatureTensors:
    """Features as stored, as tensors: float values, or int8 values with their scales."""

    values: torch.Tensor  # (N, C, h, w)
    scales: torch.Tensor | None = None  # (N, L, h, w) for int8

    @classmethod
    def from_stored(cls, stored: StoredFeatures) -> FeatureTensors:
        scales = None if stored.scales is None else torch.from_numpy(stored.scales)
        return cls(torch.from_numpy(stored.values), scales)

    def __len__(self) -> int:
        return len(self.values)

    def map(self, fn) -> FeatureTensors:
        """`fn` applied to the values and the scales alike (both lead with the image axis)."""
        return FeatureTensors(fn(self.values), None if self.scales is None else fn(self.scales))

    def to(self, device: torch.device, non_blocking: bool = False) -> FeatureTensors:
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def take(self, index: torch.Tensor | slice) -> FeatureTensors:
        return self.map(lambda t: t[index])

    def float(self) -> torch.Tensor:
        """float32 features where the tensors are (int8 values times their scales)."""
        return dequantize(self.values, self.scales)


class InMemorySource:
    """Every cached view of every image on the device (RAM or GPU): one tensor per working
    size."""

    kind = "memory"

    def __init__(self, caches: Sequence[FeatureCache], device: torch.device, progress: bool):
        cache_group = size_groups(caches)
        parts: list[list[FeatureTensors]] = [[] for _ in range(cache_group.max() + 1)]
        labels: list[list[torch.Tensor]] = [[] for _ in parts]
        views, groups = [], []
        for cache, g in zip(caches, cache_group, strict=True):
            stored, lab = cache.load_stored(progress=progress)
            n, v = stored.values.shape[:2]
            flat = stored.map(lambda a, n=n, v=v: a.reshape(n * v, *a.shape[2:]))
            parts[g].append(FeatureTensors.from_stored(flat))
            labels[g].append(torch.from_numpy(lab).reshape(n * v, *lab.shape[2:]))
            views.append(torch.full((n,), v, dtype=torch.long))
            groups.append(torch.full((n,), int(g), dtype=torch.long))
        self.num_views = torch.cat(views)
        self.group = torch.cat(groups)  # each image's size group
        # entry index of (image i, view 0) in its group's tensors; view j is offset[i] + j
        self.offset = torch.zeros_like(self.num_views)
        for g in range(len(parts)):
            mine = self.group == g
            self.offset[mine] = torch.cumsum(self.num_views[mine], 0) - self.num_views[mine]
        self.features = [_cat_features(p).to(device) for p in parts]
        self.labels = [(lab[0] if len(lab) == 1 else torch.cat(lab)).to(device) for lab in labels]
        self.device = device

    @property
    def num_images(self) -> int:
        return len(self.num_views)

    @property
    def group_sizes(self) -> list[int]:
        """Images per size group."""
        return torch.bincount(self.group).tolist()

    def batches(
        self, seed: int, epoch: int, batch_size: int, world: World = SINGLE
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm, views = epoch_order(self.num_views, seed, epoch)
        groups = self.group[perm]
        entries = self.offset[perm] + views
        for positions in size_batches(groups.numpy(), batch_size, world):
            g = int(groups[positions[0]])
            idx = entries[torch.from_numpy(positions)].to(self.device)
            yield self.features[g].take(idx).float(), self.labels[g][idx]


def _cat_features(parts: list[FeatureTensors]) -> FeatureTensors:
    # one cache: no concatenation copy, which would double the peak memory
    if len(parts) == 1:
        return parts[0]
    scales = None if parts[0].scales is None else torch.cat([p.scales for p in parts])
    return FeatureTensors(torch.cat([p.values for p in parts]), scales)


class StreamingSource:
    """Features streamed from zarr with bounded memory, read unit by unit -- whole shards of a
    format-2 cache (one request per array and shard), chunks of a format-1 one -- through a
    shuffle buffer that mixes images across units.

    An epoch (a pure function of seed, epoch and the world size) deals the units out in a
    shuffled order; the images in that order are cut into one contiguous part per rank, as
    many as the rank trains on, so under torchrun each rank reads only its own shards (at most
    two shared at the cut points, each read in part) and every image is used once. Each rank
    passes its part through a shuffle buffer of `window` chunks' worth of images (a classic
    buffer: once full, each new image replaces a random one, which is emitted), choosing a
    cached view per image. A background thread reads `READ_AHEAD` units ahead and assembles
    batches while the previous one trains; memory holds the buffer, the units read ahead and
    two batches.

    Caches of several working sizes (a single process only) are dealt out alike; each image
    goes to its size's batch, which is trained when it holds `batch_size` images (the last
    of each size at the end of the epoch), so a batch never mixes sizes."""

    kind = "stream"
    READ_AHEAD = 2

    def __init__(self, caches: Sequence[FeatureCache], device: torch.device, window: int):
        self.caches = list(caches)
        self.cache_group = size_groups(self.caches)
        self.units = [
            (ci, *c.unit_range(u)) for ci, c in enumerate(self.caches) for u in range(c.num_units)
        ]
        self.device = device
        self.buffer = max(1, window) * self.caches[0].images_per_chunk

    @property
    def num_images(self) -> int:
        return sum(c.num_images for c in self.caches)

    @property
    def group_sizes(self) -> list[int]:
        """Images per size group."""
        sizes = [0] * (self.cache_group.max() + 1)
        for cache, g in zip(self.caches, self.cache_group, strict=True):
            sizes[g] += cache.num_images
        return sizes

    def rank_segments(
        self, seed: int, epoch: int, batch_size: int, world: World = SINGLE
    ) -> tuple[list[tuple[int, int, int]], list[int]]:
        """This rank's (cache, start, stop) image ranges in reading order, and its batch sizes."""
        g = epoch_generator(seed, epoch)
        order = [self.units[u] for u in torch.randperm(len(self.units), generator=g).tolist()]
        counts = [0] * world.size
        sizes_of = []
        for r in range(world.size):
            sizes = [
                s.stop - s.start for s in rank_slices(self.num_images, batch_size, _as(world, r))
            ]
            counts[r] = sum(sizes)
            sizes_of.append(sizes)
        first = sum(counts[: world.rank])
        last = first + counts[world.rank]
        segments, at = [], 0
        for ci, start, stop in order:
            lo, hi = max(first, at), min(last, at + stop - start)
            if lo < hi:
                segments.append((ci, start + lo - at, start + hi - at))
            at += stop - start
        return segments, sizes_of[world.rank]

    def epoch_plan(
        self, seed: int, epoch: int, batch_size: int = 1, world: World = SINGLE
    ) -> tuple[np.ndarray, np.ndarray]:
        """(cache, image, view) of this rank's samples in training order, as an (n, 3) array,
        and for each the number of its images that must have been read before it is emitted:
        the shuffle buffer run on indices, so the order is known before any data is read."""
        segments, _ = self.rank_segments(seed, epoch, batch_size, world)
        return self._plan(segments, seed, epoch, world)

    def _plan(
        self, segments: list[tuple[int, int, int]], seed: int, epoch: int, world: World
    ) -> tuple[np.ndarray, np.ndarray]:
        """`epoch_plan` for this rank's `segments`."""
        rng = np.random.Generator(np.random.PCG64([seed, epoch, world.rank, world.size]))
        buffer: list[tuple[int, int, int]] = []
        rows, needed, read = [], [], 0
        for ci, start, stop in segments:
            n_views = self.caches[ci].num_views
            views = rng.integers(0, n_views, stop - start)
            slots = rng.integers(0, self.buffer, stop - start)
            for i in range(stop - start):
                sample = (ci, start + i, int(views[i]))
                read += 1
                if len(buffer) < self.buffer:
                    buffer.append(sample)
                    continue
                j = int(slots[i])
                rows.append(buffer[j])
                needed.append(read)
                buffer[j] = sample
        for j in rng.permutation(len(buffer)):
            rows.append(buffer[j])
            needed.append(read)
        return np.array(rows, dtype=np.int64).reshape(-1, 3), np.array(needed, dtype=np.int64)

    def _read(self, ci: int, start: int, stop: int) -> tuple[StoredFeatures, np.ndarray]:
        return self.caches[ci].read_range_stored(start, stop)

    def _samples(
        self,
        segments: list[tuple[int, int, int]],
        plan: np.ndarray,
        needed: np.ndarray,
        stop: threading.Event,
    ) -> Iterator[tuple[int, tuple]]:
        """This rank's samples in training order (`plan`, reading `segments`), (cache,
        (values, scales, labels)), each as soon as the unit holding it has been read: units
        are read `READ_AHEAD` ahead on a thread pool, and each image's chosen view is held
        until the plan emits it."""
        wanted = {(int(ci), int(i)): int(v) for ci, i, v in plan}
        held: dict[tuple[int, int], tuple] = {}
        pool = ThreadPoolExecutor(max_workers=self.READ_AHEAD, thread_name_prefix="stream")
        try:
            reads = deque(pool.submit(self._read, *seg) for seg in segments[: self.READ_AHEAD])
            upcoming = iter(segments[self.READ_AHEAD :])
            read, seg_index = 0, 0
            for row in range(len(plan)):
                while needed[row] > read:
                    if stop.is_set():
                        return
                    stored, labels = reads.popleft().result()
                    nxt = next(upcoming, None)
                    if nxt is not None:
                        reads.append(pool.submit(self._read, *nxt))
                    ci, start, _ = segments[seg_index]
                    seg_index += 1
                    for i in range(len(labels)):
                        v = wanted.get((ci, start + i))
                        if v is not None:
                            sc = None if stored.scales is None else stored.scales[i, v].copy()
                            held[(ci, start + i)] = (
                                stored.values[i, v].copy(),
                                sc,
                                labels[i, v].copy(),
                            )
                    read += len(labels)
                ci = int(plan[row, 0])
                yield ci, held.pop((ci, int(plan[row, 1])))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _produce(self, seed, epoch, batch_size, world, out: queue.Queue, stop: threading.Event):
        """Put this rank's batches on `out`, then None (or the exception that stopped it)."""
        try:
            segments, sizes = self.rank_segments(seed, epoch, batch_size, world)
            plan, needed = self._plan(segments, seed, epoch, world)
            samples = self._samples(segments, plan, needed, stop)
            if len(self.group_sizes) == 1:  # the batch sizes of the in-memory source
                for size in sizes:
                    batch = [sample for _, sample in itertools.islice(samples, size)]
                    if stop.is_set():
                        return
                    out.put(_stack(batch))
            else:  # several sizes: each size fills its own batches
                filling: dict[int, list[tuple]] = {}
                for ci, sample in samples:
                    batch = filling.setdefault(int(self.cache_group[ci]), [])
                    batch.append(sample)
                    if len(batch) == batch_size:
                        out.put(_stack(filling.pop(int(self.cache_group[ci]))))
                for g in sorted(filling):
                    out.put(_stack(filling[g]))
            out.put(None)
        except BaseException as e:  # surfaced in the consumer
            out.put(e)

    def batches(
        self, seed: int, epoch: int, batch_size: int, world: World = SINGLE
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        producer = threading.Thread(
            target=self._produce, args=(seed, epoch, batch_size, world, q, stop), daemon=True
        )
        producer.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield self._to_device(*item)
        finally:
            stop.set()
            while producer.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    producer.join(timeout=0.05)

    def _to_device(self, f: StoredFeatures, lab: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ft = FeatureTensors.from_stored(f.map(np.ascontiguousarray))
        lt = torch.from_numpy(np.ascontiguousarray(lab))
        if self.device.type == "cuda":
            ft, lt = ft.map(torch.Tensor.pin_memory), lt.pin_memory()
        return ft.to(self.device, non_blocking=True).float(), lt.to(self.device, non_blocking=True)


def _as(world: World, rank: int) -> World:
    """The same world seen from another rank (to size every rank's part of an epoch)."""
    return World(rank, world.size, world.local_rank, world.local_size)


def _stack(samples: list[tuple]) -> tuple[StoredFeatures, np.ndarray]:
    """A batch from (values, scales, labels) samples."""
    values = np.stack([s[0] for s in samples])
    scales = None if samples[0][1] is None else np.stack([s[1] for s in samples])
    return StoredFeatures(values, scales), np.stack([s[2] for s in samples])


def free_memory_bytes(device: torch.device) -> int:
    """Bytes free on a device: GPU memory on CUDA, available RAM otherwise."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


@dataclass(frozen=True)
class FreeMemory:
    """What one process sees free: on its training device and in host RAM."""

    device: int
    host: int

    @classmethod
    def measure(cls, device: torch.device) -> FreeMemory:
        host = free_memory_bytes(torch.device("cpu"))
        return cls(free_memory_bytes(device) if device.type == "cuda" else host, host)


# The in-memory source loads the caches on the host before moving them to the GPU: that
# transient copy (one per process on the node) may take this much of the available RAM.
HOST_STAGING_FRACTION = 0.8


def decide_source(
    needed: int,
    free: FreeMemory,
    on_gpu: bool,
    memory_budget_gb: float | None,
    stream: bool,
    local_ranks: int = 1,
) -> tuple[str, str]:
    """'memory' or 'stream' for caches of `needed` bytes, and why. The budget is
    `memory_budget_gb` per process, or half of what is free: of the GPU's memory on CUDA
    (every rank has its own GPU), of the RAM shared by the node's `local_ranks` processes on
    the CPU. On CUDA the host must also hold the staging copies while they load."""
    if stream:
        return "stream", "--stream"
    if memory_budget_gb is not None:
        budget = memory_budget_gb * 1e9
    else:
        budget = 0.5 * free.device / (1 if on_gpu else max(1, local_ranks))
    where = "GPU" if on_gpu else "CPU"
    if needed > budget:
        return "stream", f"{needed / 1e9:.2f} GB > {where} budget {budget / 1e9:.2f} GB"
    staging = needed * max(1, local_ranks)
    if on_gpu and staging > HOST_STAGING_FRACTION * free.host:
        ranks = plural(local_ranks, "process", "processes")
        return "stream", (
            f"loading {staging / 1e9:.2f} GB through host RAM ({ranks}) "
            f"> {HOST_STAGING_FRACTION:.0%} of the {free.host / 1e9:.2f} GB available"
        )
    return "memory", f"{needed / 1e9:.2f} GB <= {where} budget {budget / 1e9:.2f} GB"


def cache_bytes(caches: Sequence[FeatureCache]) -> int:
    """Bytes the caches take in memory as stored (features, scales, labels)."""
    total = 0
    for cache in caches:
        names = ["features", "labels", *(["scales"] if cache.spec.quantized else [])]
        total += sum(cache.array(name).nbytes for name in names)
    return total


def choose_source(
    caches: Sequence[FeatureCache],
    device: torch.device,
    memory_budget_gb: float | None,
    stream: bool,
    window: int,
    progress: bool,
    world: World = SINGLE,
):
    """In memory when the caches fit the budget (see `decide_source`), else streamed. Under
    DDP every rank reports what it has free and rank 0 decides for all from the tightest:
    ranks that chose differently would order the samples differently, training some images
    twice and others never."""
    needed = cache_bytes(caches)
    seen = world.gather(FreeMemory.measure(device))
    tightest = FreeMemory(min(f.device for f in seen), min(f.host for f in seen))
    decision = None
    if world.is_main:
        decision = decide_source(
            needed, tightest, device.type == "cuda", memory_budget_gb, stream, world.local_size
        )
    kind, why = world.broadcast(decision)
    if kind == "memory":
        log.info("features in %s memory (%s)", device.type.upper(), why)
        return InMemorySource(caches, device, progress)
    if world.size > 1 and len(set(size_groups(caches).tolist())) > 1:
        raise ConfigError(
            f"{plural(len(caches), 'cache')} of several working sizes must be trained in memory "
            f"under torchrun, but they are streamed ({why}): raise --memory-budget-gb, or train "
            "them in one process"
        )
    log.info("streaming features from zarr (%s)", why)
    return StreamingSource(caches, device, window)


def view0_features(cache: FeatureCache) -> tuple[FeatureTensors, torch.Tensor]:
    """A validation cache's plain-image (view 0) features (as stored) and labels, on the host."""
    stored, labels = cache.load_stored(progress=False)
    view0 = stored.map(lambda a: np.ascontiguousarray(a[:, 0]))
    return FeatureTensors.from_stored(view0), torch.from_numpy(np.ascontiguousarray(labels[:, 0]))
