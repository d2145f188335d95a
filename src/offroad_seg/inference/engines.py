"""Inference engines: the model object evaluate, predict and `api.Segmenter` run, chosen in one
place (`build_engine`).

Every engine offers what those callers use of a `SegmentationModel`:

  logits(images, tta)  resized uint8 images (B, 3, rows, cols), as the decode workers make them
                       -> float32 logits (B, K, h, w) on the head's grid, on `device`
  preprocessing, class_map, checkpoint (a `HeadCheckpoint` describing the model), device,
  backbone_spec (the backbone weights it runs: sha256 and where they were loaded from)

`torch` is `SegmentationModel` itself. `onnxruntime` runs an exported graph (`export.py`; the
model's names, metadata and digest: `onnx_model.py`) with ONNX Runtime: on the CPU, or with the
CUDA provider when the device is CUDA and the installed onnxruntime has it. A head is either a
checkpoint (.pth: the onnxruntime engine exports it to a temporary .onnx first) or an exported
.onnx (its metadata gives the class map, preprocessing and backbone; the torch engine cannot run
it). Both engines see the same uint8 images and compute the same function; their logits differ
by float32 rounding (see `LOGIT_TOLERANCE`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from offroad_seg.config import ENGINES
from offroad_seg.core.atomic import host_tag, pid_alive
from offroad_seg.core.text import plural
from offroad_seg.data.classes import ClassMap
from offroad_seg.errors import ConfigError, OffroadSegError
from offroad_seg.inference.onnx_model import (
    HEAD_LOGITS,
    INPUT,
    checkpoint_from_onnx,
    require,
    verify_weights,
)
from offroad_seg.models.checkpoint import HeadCheckpoint, load_checkpoint
from offroad_seg.models.preprocess import Preprocessing
from offroad_seg.models.segmentation import TTA, SegmentationModel, check_tta

log = logging.getLogger(__name__)

# Largest |onnxruntime - torch| of float32 logits, relative to max(1, max |logit|). Measured on
# this CPU at 266x476 (4 scenes; ViT-S/14 and ViT-S/14-reg with random weights whose blocks
# matter; linear, convnext and pyramid heads): 1.3e-6 to 2.5e-6 on the head's grid and 3e-6 to
# 1.1e-5 at the input size (ONNX Runtime's Resize rounds its weights differently). torch against
# itself at batch 1 instead of 4 differs by up to 1e-6: all of it is float32 rounding of other
# summation orders. 1e-4 leaves 10-100x room for other CPUs' kernels and for trained weights
# (DINOv2's residual stream has outlier channels of magnitude ~100, and rounding grows with
# magnitude), while real export bugs move logits by 1e-1: the other variants' position-embedding
# resize rule 9.6e-2, align_corners=True 4.2e-1, inputs one grey level off 1.1e-1.
LOGIT_TOLERANCE = 1e-4


def is_exported(path: str | Path) -> bool:
    """An exported ONNX model rather than a head checkpoint (by its suffix)."""
    return Path(path).suffix.lower() == ".onnx"


def resolve_engine(engine: str | None, head: str | Path, weights: str | None = None) -> str:
    """The engine that runs `head`: as given, or by its file type (None). Combinations no
    engine can run are refused here, before any output is touched."""
    exported = is_exported(head)
    if engine is None:
        engine = "onnxruntime" if exported else "torch"
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if exported and engine == "torch":
        raise ConfigError(
            f"{head}: an exported model runs with --engine onnxruntime "
            "(the torch engine reads the .pth head it was exported from)"
        )
    if exported and weights not in (None, "auto"):
        raise ConfigError(
            f"--weights {weights}: {head} is an exported model and holds its backbone "
            "weights; drop --weights"
        )
    return engine


def load_head(path: str | Path) -> HeadCheckpoint:
    """A head checkpoint (.pth), or the description of an exported model (.onnx) read from its
    metadata (without weights: they are in the graph)."""
    if is_exported(path):
        return checkpoint_from_onnx(path)
    return load_checkpoint(path)


def check_engine_tta(head: str | Path, ckpt: HeadCheckpoint, tta: TTA) -> None:
    """Refuse, before any output is touched, TTA scales an exported model cannot run: its
    graph has one input size (a .pth head run with the onnxruntime engine is exported at every
    size the scales need)."""
    extra = tta.extra_sizes(ckpt.preprocessing)
    if is_exported(head) and extra:
        rows, cols = ckpt.preprocessing.size
        raise ConfigError(
            f"{head}: exported for {rows}x{cols} images only; --tta-scales needs "
            f"{', '.join(f'{r}x{c}' for r, c in extra)} too: pass the .pth head "
            "(--engine onnxruntime exports each size) or drop --tta-scales"
        )


def build_engine(
    engine: str | None,
    ckpt: HeadCheckpoint,
    weights: str | None = None,
    device: torch.device | str = "cpu",
    tta: TTA | None = None,
) -> SegmentationModel | OnnxEngine:
    """The model object of `engine` ('torch', 'onnxruntime', None: by the head's file type) for
    a head loaded by `load_head`, on `device`, for the passes of `tta`."""
    if resolve_engine(engine, ckpt.path, weights) == "torch":
        return SegmentationModel.from_checkpoint(ckpt, weights, device)
    if is_exported(ckpt.path):
        check_engine_tta(ckpt.path, ckpt, tta or TTA())
        return OnnxEngine(ckpt.path, ckpt, device)
    sizes = (tta or TTA()).sizes(ckpt.preprocessing)
    return OnnxEngine.from_checkpoint(ckpt, weights, device, sizes=sizes)


SCRATCH_PREFIX = "offroad-seg-onnx-"


@contextlib.contextmanager
def export_scratch() -> Iterator[Path]:
    """A folder in the system's temporary directory for the exports of one engine (~90 MB for
    ViT-S/14), removed when the block ends. Its name holds this host and pid, so that the
    folder of a killed process (kill -9 mid-export: nothing of it runs to clean up) is removed
    by the next one."""
    root = Path(tempfile.gettempdir())
    host = host_tag()
    remove_dead_scratch(root, host)
    prefix = f"{SCRATCH_PREFIX}{host}-{os.getpid()}-"
    with tempfile.TemporaryDirectory(prefix=prefix, dir=root) as tmp:
        yield Path(tmp)


def remove_dead_scratch(root: Path, host: str) -> list[Path]:
    """Remove the `export_scratch` folders in `root` of this host's processes that are gone."""
    pattern = re.compile(rf"^{re.escape(SCRATCH_PREFIX + host)}-(\d+)-[A-Za-z0-9_]+$")
    removed = []
    for entry in root.glob(f"{SCRATCH_PREFIX}{host}-*"):
        m = pattern.match(entry.name)
        if m and entry.is_dir() and not entry.is_symlink() and not pid_alive(int(m[1])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


class OnnxEngine:
    """Exported models in ONNX Runtime sessions, one per input size, with
    `SegmentationModel`'s inference interface (see the module docstring)."""

    name = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        checkpoint: HeadCheckpoint | None = None,
        device: torch.device | str = "cpu",
        threads: int | None = None,
        verify: bool = True,
    ) -> None:
        """`path`: an exported .onnx; `checkpoint`: its `load_head` description (read from the
        file when None); `threads`: ONNX Runtime's intra-op threads (default: torch's, so both
        engines use the same cores); `verify`: check its weights digest first."""
        self.path = Path(path)
        self.checkpoint = checkpoint or checkpoint_from_onnx(self.path)
        # the graph holds the weights; a .pth head exported here sets where they came from
        self.backbone_spec = self.checkpoint.backbone
        self.device = torch.device(device)
        self.threads = threads
        self.sessions: dict[tuple[int, int], Any] = {}
        self.batches: dict[tuple[int, int], int | None] = {}  # None: dynamic
        self.add_session(self.path, verify=verify)

    def add_session(self, path: str | Path, verify: bool = True) -> None:
        """Load an exported model of this head (at its own input size) into a session, after
        checking its weights digest (`verify`; a file this process just exported needs none).
        A file ONNX Runtime cannot load is one line naming it."""
        ort = require("onnxruntime", "--engine onnxruntime")
        if verify:
            verify_weights(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads or torch.get_num_threads()
        # Idle ONNX Runtime threads spin by default: they take the cores the decode workers and
        # PNG writers of evaluate/predict need between batches (and other processes' cores)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3  # errors only: no per-session warnings on stderr
        try:
            session = ort.InferenceSession(str(path), options, providers=self._providers(ort))
        except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise OffroadSegError(f"{path}: ONNX Runtime cannot load it ({reason})") from e
        size = tuple(checkpoint_from_onnx(path).preprocessing.size)
        shape = session.get_inputs()[0].shape
        if tuple(shape[2:]) != size:  # metadata edited (in a file without a digest)
            raise OffroadSegError(
                f"{path}: its metadata says {size[0]}x{size[1]} images but its graph takes "
                f"{'x'.join(str(v) for v in shape[2:])}; export the head again"
            )
        self.sessions[size] = session
        self.batches[size] = shape[0] if isinstance(shape[0], int) else None

    @property
    def session(self):
        """The session at the working size."""
        return self.sessions[tuple(self.preprocessing.size)]

    @property
    def batch(self) -> int | None:
        return self.batches[tuple(self.preprocessing.size)]

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path | HeadCheckpoint,
        weights: str | None = None,
        device: torch.device | str = "cpu",
        sizes: Sequence[tuple[int, int]] = (),
    ) -> OnnxEngine:
        """A head checkpoint (.pth) on its backbone, exported to temporary .onnx files (dynamic
        batch; the working size and each of `sizes`) and loaded; `weights` as for
        `SegmentationModel.from_checkpoint`."""
        # lazy: only a .pth head run with onnxruntime needs the exporter (export.py never imports
        # this module: the contract both use is onnx_model.py)
        from offroad_seg.inference.export import export_model

        ckpt = checkpoint if isinstance(checkpoint, HeadCheckpoint) else load_checkpoint(checkpoint)
        start = time.perf_counter()
        model = SegmentationModel.from_checkpoint(ckpt, weights, "cpu")
        working = tuple(ckpt.preprocessing.size)
        others = [tuple(s) for s in sizes if tuple(s) != working]
        with export_scratch() as tmp:
            path = tmp / "model.onnx"
            export_model(model, path, batch=None)
            # the session holds the graph: the file can go
            engine = cls(path, ckpt, device, verify=False)
            engine.backbone_spec = model.backbone_spec
            for i, size in enumerate(others):
                path = tmp / f"model-{i}.onnx"
                export_model(model, path, size=size, batch=None)
                engine.add_session(path, verify=False)
        del model
        log.info(
            "exported %s to ONNX (%s) in %.1f s (`offroad-seg export` it once and pass "
            "the .onnx to skip this)",
            ckpt.path,
            plural(1 + len(others), "size"),
            time.perf_counter() - start,
        )
        return engine

    def _providers(self, ort) -> list:
        if self.device.type != "cuda":
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            log.warning(
                "onnxruntime has no CUDA provider here (install onnxruntime-gpu): running on CPU"
            )
            return ["CPUExecutionProvider"]
        cuda = ("CUDAExecutionProvider", {"device_id": self.device.index or 0})
        return [cuda, "CPUExecutionProvider"]

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def preprocessing(self) -> Preprocessing:
        return self.checkpoint.preprocessing

    @property
    def class_map(self) -> ClassMap:
        return self.checkpoint.class_map

    def _run(self, images: np.ndarray) -> np.ndarray:
        """Head logits of uint8 images at one of the sessions' sizes; a fixed-batch model gets
        full batches (the last one padded with zero images, whose outputs are dropped)."""
        size = tuple(images.shape[-2:])
        session, step = self.sessions[size], self.batches[size] or len(images)
        n = len(images)
        outs = []
        for s in range(0, n, step):
            chunk = images[s : s + step]
            k = len(chunk)
            if k < step:
                pad = np.zeros((step - k, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            outs.append(session.run([HEAD_LOGITS], {INPUT: chunk})[0][:k])
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
        """Resized uint8 images (B, 3, rows, cols) -> float32 logits (B, K, h, w) on the head's
        grid, on `device`; `tta="flip"` averages in the mirrored images' logits (the uint8
        images are mirrored: the same numbers the torch engine mirrors after normalising)."""
        check_tta(tta)
        size = tuple(images.shape[-2:])
        if images.dtype != torch.uint8 or size not in self.sessions:
            known = ", ".join(f"{r}x{c}" for r, c in self.sessions)
            raise ConfigError(
                f"{self.path}: expects uint8 images (B, 3, rows, cols) at {known}; got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        x = images.cpu().numpy()
        flip = tta == "flip"
        if flip:
            x = np.concatenate([x, x[..., ::-1]])
        logits = torch.from_numpy(self._run(np.ascontiguousarray(x)))
        if flip:
            n = logits.shape[0] // 2
            logits = 0.5 * (logits[:n] + logits[n:].flip(-1))
        return logits.to(self.device)

    @torch.no_grad()
    def tta_logits(
        self, images: torch.Tensor, scaled: Sequence[torch.Tensor], tta: TTA
    ) -> list[torch.Tensor]:
        """Logits of every pass of `tta`, as `SegmentationModel.tta_logits`."""
        prep = self.preprocessing
        by_size = dict(zip(tta.extra_sizes(prep), scaled, strict=True))
        by_size[tuple(prep.size)] = images
        mode = "flip" if tta.flip else "none"
        return [self.logits(by_size[size], mode) for size in tta.sizes(prep)]
