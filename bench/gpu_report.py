"""One command that checks a CUDA machine end to end and writes gpu_report.json and .md.

    python bench/gpu_report.py [--device cuda] [--images 512] [--parity-images 50]
        [--train-images 2857] [--epochs 20] [--weights random|PATH] [--out DIR]
    python bench/gpu_report.py --device cpu --images 8        # CI: the same checks on a CPU

On synthetic 960x540 scenes (`--images` of them, PNG files decoded like real data; `--data DIR`
for a real dataset) it measures and records:

  parity      features of the device's production path (autocast) and of the device in fp32
              against the CPU in fp32, on `--parity-images` images: cosine similarity per
              image (worst and mean) and the largest relative error
  precision   the backbone alone in fp32 and in the device's autocast type (bf16 where native,
              fp16 on older cards): images/s and cosine similarity between the two
  extraction  `extract` on the dataset: images/s, peak GPU memory (max_memory_allocated),
              peak host RSS of the process and of its decoding workers
  training    `train` for `--epochs` on a cache of `--train-images` images of random features
              (speed does not depend on the values): seconds, per epoch, peaks
  evaluation  `evaluate` on the dataset (metrics only, then writing masks): images/s, peaks
  second_gpu  with two GPUs: `--device cuda:1` against cuda:0, the backbone and a whole
              `extract` (the device-to-host copy's completion is tracked per device)
  syncs       training, evaluation and extraction again under
              torch.cuda.set_sync_debug_mode("warn"): every remaining host sync, where it is
              (file:line in offroad_seg, function) and how often, per step or batch
  targets     docs/performance.md's GPU targets (on an H100) beside what was measured

Every section records its error instead of stopping the report; the exit status is 1 when any
section failed. On a CPU the CUDA-only parts say why they were skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import resource
import shutil
import sys
import threading
import time
import traceback
import warnings
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch
from common import random_cache, sync, table

import offroad_seg
from offroad_seg.core.runtime import amp_dtype, resolve_device
from offroad_seg.data.classes import ClassMap
from offroad_seg.data.dataset import list_samples
from offroad_seg.data.images import read_image
from offroad_seg.data.synthetic import write_split
from offroad_seg.features.cache import FeatureCache
from offroad_seg.features.extract import ExtractConfig, extract
from offroad_seg.features.loader import (
    DecodeOptions,
    default_batch_size,
    default_workers,
    loader_shape,
    sample_bytes,
)
from offroad_seg.inference.evaluate import EvalConfig, evaluate
from offroad_seg.models.backbone import load_backbone
from offroad_seg.models.checkpoint import head_payload, save_checkpoint
from offroad_seg.models.heads import HeadConfig, build_head
from offroad_seg.models.preprocess import (
    Preprocessing,
    image_to_tensor,
    normalize,
    parse_size,
    resize_image,
)
from offroad_seg.training.loop import TrainConfig, train

REPORT_VERSION = 1
SECTIONS = (
    "machine",
    "parity",
    "precision",
    "extraction",
    "training",
    "evaluation",
    "second_gpu",
    "syncs",
    "targets",
)
# docs/performance.md's GPU targets, on an H100
TARGETS = {
    "extraction_images_per_s": 1000.0,  # from 960x540 PNGs
    "training_seconds": 30.0,  # 20 epochs on 2,857 cached images
    "evaluation_images_per_s": 500.0,
}
TARGET_TRAIN_IMAGES, TARGET_EPOCHS, TARGET_SCENE = 2857, 20, (960, 540)
# what "the same features" means: fp32 on two devices differs by summation order only;
# bf16/fp16 keep ~3 significant digits through 12 blocks
PARITY_FP32_MIN_COSINE = 0.9999
PARITY_AMP_MIN_COSINE = 0.99

log = logging.getLogger("gpu_report")
PACKAGE_DIR = os.path.join(os.path.dirname(os.path.realpath(offroad_seg.__file__)), "")


# ----------------------------------------------------------------------------- measuring


def cosine_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each image's whole feature map, (N, ...) x (N, ...) -> (N,),
    in float64 on the CPU."""
    a, b = a.double().cpu().flatten(1), b.double().cpu().flatten(1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)


def compare(a: torch.Tensor, b: torch.Tensor, min_cosine: float) -> dict:
    """Worst and mean per-image cosine similarity and the largest relative L2 error."""
    cos = cosine_per_image(a, b)
    a64, b64 = a.double().cpu().flatten(1), b.double().cpu().flatten(1)
    rel = (a64 - b64).norm(dim=1) / b64.norm(dim=1).clamp_min(1e-300)
    worst = float(cos.min())
    return {
        "images": len(cos),
        "cosine": [round(float(c), 7) for c in cos],
        "cosine_worst": worst,
        "cosine_mean": float(cos.mean()),
        "worst_image": int(cos.argmin()),
        "relative_error_max": float(rel.max()),
        "min_cosine": min_cosine,
        "ok": worst >= min_cosine,
    }


def _rss_bytes(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    return out


class Peaks:
    """Peak GPU memory (allocated and reserved by torch) and peak host RSS of this process
    (the kernel's high-water mark, reset on entry where Linux allows, else sampled) and of
    its child processes together (decoding workers; sampled every 50 ms, shared pages counted
    once per process)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.result: dict = {}

    def __enter__(self) -> Peaks:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._hwm_reset = False
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM, the peak RSS
            self._hwm_reset = True
        self._self_peak = _rss_bytes()
        self._children_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        me = os.getpid()
        while not self._stop.wait(0.05):
            self._self_peak = max(self._self_peak, _rss_bytes())
            todo, total = _children(me), 0
            while todo:
                pid = todo.pop()
                total += _rss_bytes(pid)
                todo += _children(pid)
            self._children_peak = max(self._children_peak, total)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        peak = self._self_peak
        if self._hwm_reset:
            with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        if not peak:  # no /proc: the lifetime peak
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.result = {"host_rss_peak_gb": peak / 1e9}
        self.result["workers_rss_peak_gb"] = self._children_peak / 1e9
        if self.device.type == "cuda":
            sync(self.device)
            self.result["gpu_allocated_peak_gb"] = (
                torch.cuda.max_memory_allocated(self.device) / 1e9
            )
            self.result["gpu_reserved_peak_gb"] = torch.cuda.max_memory_reserved(self.device) / 1e9


# ----------------------------------------------------------------------------- data


def make_dataset(root: Path, images: int, scene: tuple[int, int], unique: int = 64) -> Path:
    """`images` synthetic scenes in the dataset format: `unique` distinct ones drawn, then
    copied under new names (decoding costs the same; drawing thousands would take minutes)."""
    data = root / f"synth{images}-{scene[0]}x{scene[1]}"
    if (data / "Segmentation").is_dir() and len(list((data / "Segmentation").iterdir())) == images:
        return data
    shutil.rmtree(data, ignore_errors=True)
    drawn = min(images, unique)
    write_split(data, drawn, seed=0, width=scene[0], height=scene[1])
    names = sorted(p.name for p in (data / "Color_Images").iterdir())
    for i in range(drawn, images):
        source = names[i % drawn]
        name = f"copy{i:06d}.png"
        for sub in ("Color_Images", "Segmentation"):
            shutil.copyfile(data / sub / source, data / sub / name)
    return data


def loader_bound(
    data: Path, size: tuple[int, int], device: torch.device, batch: int | None, labels: str
) -> dict:
    """The decoding pipeline's host-memory bound on this machine (see loader.loader_shape):
    workers and prefetch at the device's defaults and the decoded bytes they may hold."""
    from PIL import Image

    with Image.open(list_samples(data)[0].image) as img:
        width, height = img.size
    opts = DecodeOptions(prep=Preprocessing(size=size), class_map=ClassMap.default(), labels=labels)
    per = sample_bytes(opts, (height, width))
    batch = batch or default_batch_size(device)
    workers, prefetch = loader_shape(default_workers(device), batch, per)
    return {
        "workers": workers,
        "prefetch": prefetch,
        "batch": batch,
        "sample_mb": per / 1e6,
        "in_flight_gb": workers * (prefetch or 0) * batch * per / 1e9,
    }


def resized_images(data: Path, n: int, prep: Preprocessing) -> torch.Tensor:
    samples = list_samples(data)[:n]
    return torch.cat([resize_image(image_to_tensor(read_image(s.image)), prep) for s in samples])


# ----------------------------------------------------------------------------- sections


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "autocast": str(amp_dtype(device)).removeprefix("torch.") if amp_dtype(device) else None,
    }
    with contextlib.suppress(OSError, ValueError):
        info["host_ram_gb"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_count=torch.cuda.device_count(),
            compute_capability=f"{props.major}.{props.minor}",
            gpu_memory_gb=props.total_memory / 1e9,
            cudnn=torch.backends.cudnn.version(),
            # "fp32" convolutions and matmuls may run in TF32 on Ampere and later
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
            tf32_cudnn=torch.backends.cudnn.allow_tf32,
        )
    return info


def forward(backbone, x: torch.Tensor, prep, device, amp: bool, batch: int) -> torch.Tensor:
    """Features (N, C, h, w) as float32 on the host: the production path (`encode`: autocast)
    when `amp`, else plain fp32 on the device."""
    out = []
    for s in range(0, len(x), batch):
        xb = x[s : s + batch]
        if amp:
            out.append(backbone.encode(xb, prep).cpu())
        else:
            with torch.no_grad():
                out.append(backbone(normalize(xb.to(device), prep)).float().cpu())
    return torch.cat(out)


def images_per_s(backbone, x: torch.Tensor, prep, device, amp: bool, batch: int) -> float:
    """The backbone alone on images held in device memory (best of 2 passes)."""
    x = x.to(device)
    best = float("inf")
    for _ in range(2):
        sync(device)
        t = time.perf_counter()
        for s in range(0, len(x), batch):
            xb = x[s : s + batch]
            if amp:
                backbone.encode(xb, prep)
            else:
                with torch.no_grad():
                    backbone(normalize(xb, prep))
        sync(device)
        best = min(best, time.perf_counter() - t)
    return len(x) / best


def parity_and_precision(args, data: Path, device: torch.device, report: dict) -> dict:
    """The parity section (returned) and the precision section (into `report`)."""
    prep = Preprocessing(size=args.size)
    x = resized_images(data, args.parity_images, prep)
    batch = args.batch_size or default_batch_size(device)
    cpu = torch.device("cpu")
    cpu_backbone = load_backbone(args.weights, device=cpu)
    t = time.perf_counter()
    reference = forward(cpu_backbone, x, prep, cpu, False, batch if device == cpu else 8)
    cpu_speed = len(x) / (time.perf_counter() - t)
    if device.type == "cpu":
        backbone, on_device = cpu_backbone, reference
    else:
        backbone = load_backbone(args.weights, device=device)
        on_device = forward(backbone, x, prep, device, False, batch)
    parity = {"fp32": compare(on_device, reference, PARITY_FP32_MIN_COSINE)}
    amp = amp_dtype(device)
    precision: dict = {"autocast": str(amp).removeprefix("torch.") if amp else None}
    precision["fp32_images_per_s"] = (
        cpu_speed if device.type == "cpu" else images_per_s(backbone, x, prep, device, False, batch)
    )
    if amp is None:
        parity["autocast"] = {"skipped": f"no autocast on {device.type}: features are fp32"}
        precision["skipped"] = f"no autocast on {device.type}"
    else:
        amp_feats = forward(backbone, x, prep, device, True, batch)
        parity["autocast"] = compare(amp_feats, reference, PARITY_AMP_MIN_COSINE)
        precision["vs_fp32"] = compare(amp_feats, on_device, PARITY_AMP_MIN_COSINE)
        precision["autocast_images_per_s"] = images_per_s(backbone, x, prep, device, True, batch)
        precision["speedup"] = precision["autocast_images_per_s"] / precision["fp32_images_per_s"]
    report["precision"] = precision
    return parity


def extraction(args, data: Path, device: torch.device, out: Path) -> dict:
    cache = out / "extract.zarr"
    shutil.rmtree(cache, ignore_errors=True)
    config = extract_config(args, data, cache, device)
    with Peaks(device) as peaks:
        summary = extract(config)
    return {
        "images": summary.images,
        "seconds": summary.seconds,
        "images_per_s": summary.images_per_s,
        "total_seconds": summary.extra["total_seconds"],
        "cache_bytes_per_image": summary.bytes_on_disk / summary.images,
        "cache": str(cache),
        "loader": loader_bound(data, args.size, device, args.batch_size, "working"),
        **peaks.result,
    }


def training(args, device: torch.device, out: Path) -> dict:
    cache = out / f"random{args.train_images}.zarr"
    if not (cache / "zarr.json").exists():
        random_cache(cache, args.train_images, args.size)
    run = out / "train-run"
    shutil.rmtree(run, ignore_errors=True)
    config = TrainConfig(
        caches=(cache,),
        out=run,
        epochs=args.epochs,
        batch_size=args.train_batch_size,
        device=str(device),
        progress=False,
    )
    with Peaks(device) as peaks:
        t = time.perf_counter()
        result = train(config)
        seconds = time.perf_counter() - t
    epochs = [row["seconds"] for row in result.history]
    return {
        "images": args.train_images,
        "epochs": args.epochs,
        "batch_size": args.train_batch_size,
        "source": result.source,
        "seconds": seconds,
        "epoch_seconds_first": epochs[0],
        "epoch_seconds_median": sorted(epochs)[len(epochs) // 2],
        "image_epochs_per_s": args.train_images * args.epochs / seconds,
        **peaks.result,
    }


def extract_config(args, data, cache, device) -> ExtractConfig:
    """The report's extraction settings."""
    return ExtractConfig(
        data_dir=data,
        cache=cache,
        weights=args.weights,
        size=args.size,
        device=str(device),
        batch_size=args.batch_size,
        progress=False,
    )


def eval_config(args, head, data, out, device, write_masks: bool) -> EvalConfig:
    """The report's evaluation settings: no comparison panels, masks or not."""
    return EvalConfig(
        head=head,
        data_dir=data,
        out=out,
        weights=args.weights,
        batch_size=args.batch_size,
        device=str(device),
        comparisons=0,
        write_masks=write_masks,
        progress=False,
    )


def untrained_head(cache_path: Path, out: Path) -> Path:
    """A default head for the cache's backbone, untrained (evaluation speed does not depend
    on its weights; training one would only add minutes of plots and checkpoints)."""
    spec = FeatureCache.open(cache_path).spec
    config = HeadConfig(
        name=TrainConfig.head,
        in_channels=spec.backbone.channels,
        num_classes=len(spec.class_map.names),
    )
    torch.manual_seed(0)
    head = build_head(config)
    payload = head_payload(config, spec.class_map, spec.backbone, spec.preprocessing)
    path = out / "segmentation_head.pth"
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {**payload, "state_dict": head.state_dict()})
    return path


def evaluation(args, data: Path, device: torch.device, out: Path, cache: Path) -> dict:
    head = out / "eval-head"
    shutil.rmtree(head, ignore_errors=True)
    head_file = untrained_head(cache, head)
    result: dict = {}
    for name, masks in (("metrics_only", False), ("writing_masks", True)):
        target = out / f"eval-{name}"
        shutil.rmtree(target, ignore_errors=True)
        config = eval_config(args, head_file, data, target, device, masks)
        with Peaks(device) as peaks:
            run = evaluate(config)
        result[name] = {
            "images": run.images,
            "seconds": run.seconds,
            "images_per_s": run.images_per_s,
            "miou": run.metrics.miou,
            **peaks.result,
        }
    result["loader"] = loader_bound(data, args.size, device, args.batch_size, "original")
    result["head"] = str(head_file)
    return result


def second_gpu(args, data: Path, device: torch.device, out: Path) -> dict:
    if device.type != "cuda":
        return {"skipped": "not a CUDA run"}
    if torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU on this machine"}
    first, second = torch.device("cuda", 0), torch.device("cuda", 1)
    prep = Preprocessing(size=args.size)
    n = min(args.parity_images, args.images)
    x = resized_images(data, n, prep)
    batch = args.batch_size or default_batch_size(device)
    try:
        feats = {}
        for dev in (first, second):
            resolve_device(dev)
            feats[dev.index] = forward(
                load_backbone(args.weights, device=dev), x, prep, dev, True, batch
            )
        result = {"backbone": compare(feats[1], feats[0], PARITY_FP32_MIN_COSINE)}
        result["backbone"]["identical"] = bool(torch.equal(feats[1], feats[0]))
        caches = {}
        for dev in (first, second):
            cache = out / f"extract-cuda{dev.index}.zarr"
            shutil.rmtree(cache, ignore_errors=True)
            extract(extract_config(args, data, cache, dev))
            caches[dev.index] = cache
        import zarr

        a = zarr.open_group(str(caches[0]), mode="r")["features"][:]
        b = zarr.open_group(str(caches[1]), mode="r")["features"][:]
        fa, fb = torch.from_numpy(a[:, 0]).float(), torch.from_numpy(b[:, 0]).float()
        result["extract"] = compare(fb, fa, PARITY_FP32_MIN_COSINE)
        result["extract"]["identical"] = bool((a == b).all())
        return result
    finally:
        resolve_device(device)


def _short(filename: str) -> str:
    """A path from the package on (offroad_seg/... or torch/...), else as it is."""
    path = filename.replace("\\", "/")
    for package in ("offroad_seg/", "torch/"):
        if package in path:
            return package + path.rsplit(package, 1)[1]
    return path


class SyncLog:
    """Host syncs reported by torch.cuda.set_sync_debug_mode("warn"), by where they happen:
    the innermost frame inside offroad_seg (else the innermost frame) and its function."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.messages: dict[tuple, str] = {}
        self.inner: dict[tuple, str] = {}  # the innermost frame (often inside torch)

    def record(self, message: str, stack: list[traceback.FrameSummary]) -> None:
        stack = [f for f in stack if not f.filename.endswith("warnings.py")]
        ours = [f for f in stack if os.path.realpath(f.filename).startswith(PACKAGE_DIR)]
        frame = (ours or stack or [None])[-1]
        key = ("?", 0, "?") if frame is None else (_short(frame.filename), frame.lineno, frame.name)
        self.counts[key] += 1
        self.messages.setdefault(key, message.splitlines()[0][:160])
        if stack:
            inner = stack[-1]
            self.inner.setdefault(key, f"{_short(inner.filename)}:{inner.lineno} ({inner.name})")

    @contextlib.contextmanager
    def capture(self, set_mode=None):
        """Turn sync warnings on and record every one (with the stack that raised it).
        `set_mode`: torch.cuda.set_sync_debug_mode unless given (tests pass a stand-in)."""
        set_mode = set_mode or torch.cuda.set_sync_debug_mode
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            text = str(message)
            if "synchroniz" not in text.lower():
                previous(message, category, filename, lineno, file, line)
                return
            self.record(text, traceback.extract_stack()[:-1])

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            set_mode("warn")
            try:
                yield self
            finally:
                set_mode("default")
                warnings.showwarning = previous

    def rows(self, steps: int) -> list[dict]:
        """Each place with its count and whether it happens once per step/batch or more."""
        return [
            {
                "where": f"{file}:{line}",
                "function": name,
                "count": count,
                "per_step": count >= steps,
                "message": self.messages[(file, line, name)],
                "innermost": self.inner.get((file, line, name), ""),
            }
            for (file, line, name), count in self.counts.most_common()
        ]


def syncs(args, data: Path, device: torch.device, out: Path, eval_head: Path | None) -> dict:
    if device.type != "cuda":
        return {"skipped": "sync debug mode is CUDA's"}
    result: dict = {}
    n_train = min(args.train_images, 256)
    cache = out / f"random{n_train}-syncs.zarr"
    val = out / "random32-syncs-val.zarr"
    if not (cache / "zarr.json").exists():
        random_cache(cache, n_train, args.size)
    if not (val / "zarr.json").exists():
        random_cache(val, 32, args.size, seed=1)
    run = out / "sync-train"
    shutil.rmtree(run, ignore_errors=True)
    epochs = 2
    log_ = SyncLog()
    with log_.capture():  # steps, validation (per epoch) and checkpoints (per epoch)
        train(
            TrainConfig(
                caches=(cache,),
                out=run,
                val_cache=val,
                epochs=epochs,
                batch_size=args.train_batch_size,
                device=str(device),
                progress=False,
            )
        )
    steps = epochs * -(-n_train // args.train_batch_size)
    result["training"] = {"steps": steps, "syncs": log_.rows(steps)}
    batch = args.batch_size or default_batch_size(device)
    if eval_head is not None:
        target = out / "sync-eval"
        shutil.rmtree(target, ignore_errors=True)
        log_ = SyncLog()
        with log_.capture():
            evaluate(eval_config(args, eval_head, data, target, device, write_masks=True))
        batches = -(-args.images // batch)
        result["evaluation"] = {"batches": batches, "syncs": log_.rows(batches)}
    cache = out / "sync-extract.zarr"
    shutil.rmtree(cache, ignore_errors=True)
    log_ = SyncLog()
    with log_.capture():
        extract(extract_config(args, data, cache, device))
    batches = -(-args.images // batch)
    result["extraction"] = {"batches": batches, "syncs": log_.rows(batches)}
    return result


def targets(args, report: dict) -> list[dict]:
    """docs/performance.md's GPU targets next to this run's numbers (and the settings they
    assume)."""
    rows = []
    ex = report.get("extraction", {})
    same_scene = tuple(args.scene) == TARGET_SCENE
    if "images_per_s" in ex:
        rows.append(
            {
                "target": "extraction from 960x540 PNGs",
                "goal": f">= {TARGETS['extraction_images_per_s']:.0f} images/s",
                "measured": f"{ex['images_per_s']:.1f} images/s",
                "comparable": same_scene,
                "met": ex["images_per_s"] >= TARGETS["extraction_images_per_s"],
            }
        )
    tr = report.get("training", {})
    if "seconds" in tr:
        same = tr["images"] == TARGET_TRAIN_IMAGES and tr["epochs"] == TARGET_EPOCHS
        estimate = TARGET_TRAIN_IMAGES * TARGET_EPOCHS / tr["image_epochs_per_s"]
        rows.append(
            {
                "target": f"{TARGET_EPOCHS} epochs on {TARGET_TRAIN_IMAGES:,} cached images",
                "goal": f"< {TARGETS['training_seconds']:.0f} s",
                "measured": f"{tr['seconds']:.1f} s ({tr['epochs']} epochs on {tr['images']})"
                + ("" if same else f"; scaled: {estimate:.1f} s"),
                "comparable": same,
                "met": estimate < TARGETS["training_seconds"],
            }
        )
    ev = report.get("evaluation", {}).get("metrics_only", {})
    if "images_per_s" in ev:
        rows.append(
            {
                "target": "evaluation",
                "goal": f">= {TARGETS['evaluation_images_per_s']:.0f} images/s",
                "measured": f"{ev['images_per_s']:.1f} images/s",
                "comparable": same_scene,
                "met": ev["images_per_s"] >= TARGETS["evaluation_images_per_s"],
            }
        )
    return rows


# ----------------------------------------------------------------------------- output


def _fmt(value) -> str:
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def markdown(report: dict) -> str:
    m = report["machine"]
    what = m.get("gpu") or f"CPU, {m.get('cpu_count')} cores"
    lines = [
        "# offroad-seg GPU report",
        "",
        f"{report['created']} — {what}; torch {m.get('torch')}, CUDA {m.get('cuda_runtime')}, "
        f"autocast {m.get('autocast')}; settings: {json.dumps(report['settings'])}",
        "",
    ]
    for name in SECTIONS:
        value = report.get(name)
        lines.append(f"## {name}")
        lines.append("")
        if isinstance(value, dict) and "error" in value:
            lines += [f"**failed**: `{value['error']}`", ""]
            continue
        if isinstance(value, dict) and "skipped" in value:
            lines += [f"skipped: {value['skipped']}", ""]
            continue
        if name == "targets":
            rows = [
                (r["target"], r["goal"], r["measured"], r["comparable"], r["met"]) for r in value
            ]
            header = ("target (H100)", "goal", "measured", "same settings", "met")
            lines += [_md_table(rows, header), ""]
            continue
        if name == "syncs":
            for stage, data in value.items():
                if not isinstance(data, dict):
                    continue
                per = "steps" if "steps" in data else "batches"
                lines.append(f"**{stage}** ({data.get(per)} {per}):")
                lines.append("")
                rows = [
                    (s["where"], s["function"], s["count"], s["per_step"], s["innermost"])
                    for s in data["syncs"]
                ]
                header = ("where", "function", "count", f"every {per[:-1]}", "innermost frame")
                lines += [_md_table(rows, header) if rows else "none", ""]
            continue
        flat = _flatten(value)
        lines += [_md_table([(k, _fmt(v)) for k, v in flat.items()], ("key", "value")), ""]
    return "\n".join(lines)


def _flatten(value, prefix: str = "") -> dict:
    if not isinstance(value, dict):
        return {prefix or "value": value}
    out: dict = {}
    for key, v in value.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(_flatten(v, name) if isinstance(v, dict) else {name: v})
    return out


def _md_table(rows: list[tuple], header: tuple) -> str:
    cells = [[str(c).replace("|", "\\|") for c in row] for row in rows]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in cells])


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu [auto]")
    p.add_argument("--data", type=Path, help="a dataset folder instead of synthetic scenes")
    p.add_argument("--images", type=int, default=None, help="[512 on CUDA, 8 on CPU]")
    p.add_argument("--parity-images", type=int, default=50)
    p.add_argument("--train-images", type=int, default=None, help="[2857 on CUDA, --images]")
    p.add_argument("--epochs", type=int, default=None, help="training [20 on CUDA, 3 on CPU]")
    p.add_argument("--batch-size", type=int, default=None, help="extract/evaluate [by device]")
    p.add_argument("--train-batch-size", type=int, default=8)
    p.add_argument("--size", type=parse_size, default=(266, 476), help="working size ROWSxCOLS")
    p.add_argument("--scene", default="960x540", help="synthetic scene size WIDTHxHEIGHT")
    p.add_argument("--weights", default="random")
    p.add_argument("--workdir", type=Path, default=Path("runs/gpu-report"), help="scratch")
    p.add_argument("--out", type=Path, default=Path("."), help="where the report goes")
    p.add_argument("--skip", default="", help="comma-separated sections to leave out")
    args = p.parse_args(argv)
    args.scene = tuple(int(v) for v in args.scene.lower().split("x"))
    return args


def run_section(report: dict, name: str, fn, *a) -> dict:
    """Run one section, recording its error (one line, and the traceback) instead of
    stopping the whole report."""
    started = time.perf_counter()
    try:
        value = fn(*a)
    except Exception as e:
        log.exception("section %s failed", name)
        value = {
            "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            "traceback": traceback.format_exc(),
        }
    value["section_seconds"] = time.perf_counter() - started
    report[name] = value
    return value


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.images is None:
        args.images = 512 if device.type == "cuda" else 8
    if args.train_images is None:
        args.train_images = TARGET_TRAIN_IMAGES if device.type == "cuda" else args.images
    if args.epochs is None:
        args.epochs = TARGET_EPOCHS if device.type == "cuda" else 3
    args.parity_images = min(args.parity_images, args.images)
    skip = set(filter(None, args.skip.split(",")))
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "report": "offroad-seg gpu report",
        "version": REPORT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
        "settings": {
            "device": str(device),
            "images": args.images,
            "parity_images": args.parity_images,
            "train_images": args.train_images,
            "epochs": args.epochs,
            "batch_size": args.batch_size or default_batch_size(device),
            "train_batch_size": args.train_batch_size,
            "size": list(args.size),
            "scene": list(args.scene),
            "weights": args.weights,
            "data": str(args.data) if args.data else "synthetic",
        },
    }
    report["machine"] = machine_info(device)
    data = args.data or make_dataset(work, args.images, args.scene)

    def skipped(name: str) -> bool:
        if name in skip:
            report[name] = {"skipped": "--skip"}
        return name in skip

    if not skipped("parity"):
        report["precision"] = {"skipped": "the parity section failed"}
        run_section(report, "parity", parity_and_precision, args, data, device, report)
    if not skipped("extraction"):
        run_section(report, "extraction", extraction, args, data, device, work)
    if not skipped("training"):
        run_section(report, "training", training, args, device, work)
    eval_head = None
    cache = Path(report.get("extraction", {}).get("cache", work / "extract.zarr"))
    if not skipped("evaluation"):
        if (cache / "zarr.json").exists():
            run_section(report, "evaluation", evaluation, args, data, device, work, cache)
            eval_head = report["evaluation"].get("head")
        else:
            report["evaluation"] = {"skipped": "no cache: extraction did not run"}
    if not skipped("second_gpu"):
        run_section(report, "second_gpu", second_gpu, args, data, device, work)
    if not skipped("syncs"):
        head = Path(eval_head) if eval_head else None
        run_section(report, "syncs", syncs, args, data, device, work, head)
    report["targets"] = targets(args, report)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / "gpu_report.md").write_text(markdown(report) + "\n")
    failed = [k for k, v in report.items() if isinstance(v, dict) and "error" in v]
    print(
        table(
            [(r["target"], r["goal"], r["measured"], r["met"]) for r in report["targets"]],
            ("target (H100)", "goal", "measured", "met"),
        )
    )
    print(f"wrote {args.out / 'gpu_report.json'} and {args.out / 'gpu_report.md'}")
    if failed:
        print(f"failed sections: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
