"""Feature sources for head training: cached features in memory, or streamed from zarr.

Both sources turn an epoch's global sample order (a pure function of seed and epoch) into
global batches of `batch_size`; under DDP each rank takes its contiguous slice of every global
batch. With the loss normalised by the global pixel weight (see `train_head.train_one_epoch`)
K ranks then compute exactly the gradient one process computes for the global batch.

Caches of several working sizes train together (scale augmentation), but a batch never mixes
sizes: `size_batches` groups the epoch order by size (see there; with one size it is the plain
cut into consecutive batches, so one-size training is unchanged).

A source is built once and can feed any number of trainings (a sweep trains many heads on
the features it loaded). Features stay in the cache's storage type (float16, or int8 with
per-token scales) until a batch is taken, and are made float32 on the training device.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from offroad_seg.core.distributed import SINGLE, World
from offroad_seg.core.text import plural
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
    """Features streamed from zarr with bounded memory. The epoch order shuffles the chunk
    order, then the images within each window of `window` chunks (seed and epoch decide
    both); a background thread reads this rank's images window by window (one zarr selection
    per cache, decoded concurrently) while the previous window trains. Memory holds about
    two windows."""

    kind = "stream"

    def __init__(self, caches: Sequence[FeatureCache], device: torch.device, window: int):
        self.caches = list(caches)
        self.cache_group = size_groups(self.caches)
        self.chunks = [(ci, k) for ci, c in enumerate(self.caches) for k in range(c.num_chunks)]
        self.device = device
        self.window = max(1, window)

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

    def epoch_plan(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(cache, image, view) of every sample in epoch order, as an (N, 3) array, and where
        each window starts in it."""
        g = epoch_generator(seed, epoch)
        order = torch.randperm(len(self.chunks), generator=g).tolist()
        parts, starts, total = [], [], 0
        for w in range(0, len(order), self.window):
            rows = [
                (ci, i)
                for ci, k in (self.chunks[c] for c in order[w : w + self.window])
                for i in range(*self.caches[ci].chunk_range(k))
            ]
            rows = np.array(rows, dtype=np.int64)[torch.randperm(len(rows), generator=g).numpy()]
            n_views = np.array([self.caches[ci].num_views for ci in rows[:, 0]])
            views = (torch.rand(len(rows), generator=g).numpy() * n_views).astype(np.int64)
            parts.append(np.column_stack([rows, views]))
            starts.append(total)
            total += len(rows)
        return np.concatenate(parts), np.array([*starts, total])

    def _read(self, plan: np.ndarray) -> dict[int, tuple[StoredFeatures, np.ndarray]]:
        """Features (as stored) and labels of the (cache, image, view) rows of `plan`, per size
        group, each in `plan`'s order."""
        out = {}
        row_group = self.cache_group[plan[:, 0]]
        for g in np.unique(row_group):
            out[int(g)] = self._read_group(plan[row_group == g])
        return out

    def _read_group(self, plan: np.ndarray) -> tuple[StoredFeatures, np.ndarray]:
        """`_read` for rows of caches of one working size."""
        first = self.caches[plan[0, 0]]
        values = np.empty((len(plan), *first.array("features").shape[2:]), first.spec.dtype)
        scales = None
        if first.spec.quantized:
            scales = np.empty((len(plan), *first.array("scales").shape[2:]), np.float32)
        labels = np.empty((len(plan), *first.array("labels").shape[2:]), dtype=np.uint8)
        for ci, cache in enumerate(self.caches):
            rows = np.flatnonzero(plan[:, 0] == ci)
            if not len(rows):
                continue
            images, inverse = np.unique(plan[rows, 1], return_inverse=True)
            stored, lab = cache.read_images_stored(images)
            values[rows] = stored.values[inverse, plan[rows, 2]]
            if scales is not None:
                scales[rows] = stored.scales[inverse, plan[rows, 2]]
            labels[rows] = lab[inverse, plan[rows, 2]]
        return StoredFeatures(values, scales), labels

    def _reader(self, segments: list[np.ndarray], out: queue.Queue, stop: threading.Event):
        try:
            for plan in segments:
                if stop.is_set():
                    return
                out.put(self._read(plan))
            out.put(None)
        except BaseException as e:  # surfaced in the consumer
            out.put(e)

    def batches(
        self, seed: int, epoch: int, batch_size: int, world: World = SINGLE
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan, window_starts = self.epoch_plan(seed, epoch)
        groups = self.cache_group[plan[:, 0]]
        batches = size_batches(groups, batch_size, world)
        # this rank's rows in plan order, cut at window boundaries: each segment is one read
        mine = np.sort(np.concatenate(batches)) if batches else np.zeros(0, np.int64)
        window_of = np.searchsorted(window_starts, mine, side="right") - 1
        cuts = np.flatnonzero(np.diff(window_of)) + 1
        segments = [plan[part] for part in np.split(mine, cuts)]
        q: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()
        reader = threading.Thread(target=self._reader, args=(segments, q, stop), daemon=True)
        reader.start()
        # rows read but not yet trained, per size group, in plan order: a group's batches take
        # its rows first come first (this rank's rows of a group are its batches' in order)
        buffered: dict[int, list[tuple[StoredFeatures, np.ndarray]]] = {}
        count: dict[int, int] = {}
        try:
            for positions in batches:
                g, size = int(groups[positions[0]]), len(positions)
                while count.get(g, 0) < size:
                    item = q.get()
                    if isinstance(item, BaseException):
                        raise item
                    for h, part in item.items():
                        buffered.setdefault(h, []).append(part)
                        count[h] = count.get(h, 0) + len(part[1])
                f, lab = _concat(buffered[g])
                yield self._to_device(f.map(lambda a, n=size: a[:n]), lab[:size])
                buffered[g] = [(f.map(lambda a, n=size: a[n:]), lab[size:])]
                count[g] -= size
        finally:
            stop.set()
            while reader.is_alive():  # unblock a reader waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    reader.join(timeout=0.05)

    def _to_device(self, f: StoredFeatures, lab: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ft = FeatureTensors.from_stored(f.map(np.ascontiguousarray))
        lt = torch.from_numpy(np.ascontiguousarray(lab))
        if self.device.type == "cuda":
            ft, lt = ft.map(torch.Tensor.pin_memory), lt.pin_memory()
        return ft.to(self.device, non_blocking=True).float(), lt.to(self.device, non_blocking=True)


def _concat(parts: list[tuple[StoredFeatures, np.ndarray]]) -> tuple[StoredFeatures, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    scales = None
    if parts[0][0].scales is not None:
        scales = np.concatenate([p[0].scales for p in parts])
    values = np.concatenate([p[0].values for p in parts])
    return StoredFeatures(values, scales), np.concatenate([p[1] for p in parts])


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
    log.info("streaming features from zarr (%s)", why)
    return StreamingSource(caches, device, window)


def view0_features(cache: FeatureCache) -> tuple[FeatureTensors, torch.Tensor]:
    """A validation cache's plain-image (view 0) features (as stored) and labels, on the host."""
    stored, labels = cache.load_stored(progress=False)
    view0 = stored.map(lambda a: np.ascontiguousarray(a[:, 0]))
    return FeatureTensors.from_stored(view0), torch.from_numpy(np.ascontiguousarray(labels[:, 0]))
