"""Export a trained head and its backbone as one ONNX graph, for runtimes without PyTorch
(ONNX Runtime on a CPU or GPU, TensorRT on embedded GPUs).

The graph is the whole inference path after the resize: uint8 RGB images at the working size,
exactly what `preprocess.resize_image` makes, -> ImageNet normalisation -> the backbone (its
position embeddings resized to that grid, or for DINOv3 its rotary sines and cosines computed
for it, at export time, as constants) -> the head -> logits.

  input   images       (B, 3, rows, cols) uint8 RGB
  output  logits       (B, K, rows, cols) float32: the head's logits upsampled to the input size
                       (bilinear, align_corners=False, as evaluate upsamples them)
          head_logits  (B, K, h, w) float32: the head's own output grid (the token grid; x4 for
                       the pyramid head). Upsample these to another size (the camera's) directly:
                       evaluate does, and resizing twice would not give the same logits
          ids          (B, rows, cols) uint8 argmax class ids of `logits` (only with argmax=True)

The batch is fixed (TensorRT builds its fastest engines for static shapes) or dynamic. The
model's metadata_props describe everything a user needs without this package; what they hold,
the input and output names and the weights digest are `onnx_model.py`'s (`METADATA`), whose
`checkpoint_from_onnx` turns them back into a `HeadCheckpoint` for evaluate and predict.

Exporter: the torch.export-based one (`torch.onnx.export(dynamo=True)`). The TorchScript-based
exporter is deprecated since torch 2.9 and cannot export the pyramid head (its adaptive average
pooling to grids that do not divide the token grid); the dynamo exporter exports every head and
backbone variant, and writes a smaller, cleaner graph (no Identity/Constant chains, fused GELU
patterns ONNX Runtime recognises). It is slower (~7 s instead of ~1 s for ViT-S/14), once.
Opset 18 is the lowest it emits: the widest runtime support (TensorRT 8.6 and later, ONNX Runtime
1.14 and later); opset 23's fused Attention op ran about 2x slower in ONNX Runtime 1.32 on CPU.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from offroad_seg.config import ExportConfig
from offroad_seg.core.atomic import remove_stale_temps, temp_path
from offroad_seg.errors import ConfigError, OffroadSegError
from offroad_seg.inference.onnx_model import IDS, INPUT, OUTPUTS, metadata, require, seal
from offroad_seg.models.backbone import Backbone
from offroad_seg.models.checkpoint import load_checkpoint, resolve_head
from offroad_seg.models.preprocess import Preprocessing, check_size
from offroad_seg.models.segmentation import SegmentationModel

log = logging.getLogger(__name__)

OPSET = 18
QUANTIZE_MODES = ("none", "dynamic")


# ----------------------------------------------------------------------------- the graph


class FixedGridBackbone(Backbone):
    """The backbone with its position information computed once, for one token grid, and held
    as buffers (DINOv2: the resized position embeddings; DINOv3: the rotary sines and cosines):
    exporters see shapes symbolically, so the per-grid cache of `Backbone` cannot be looked up
    while tracing, and the antialiased bicubic resize of the DINOv2 register variants has no
    ONNX equivalent. The forward pass is `Backbone.forward`, unchanged."""

    def __init__(self, backbone: Backbone, grid: tuple[int, int]) -> None:
        super().__init__(backbone.vit, backbone.spec)
        if backbone.tails is not None:  # an ensemble's tuned members: one graph, every branch
            self.set_tails(list(backbone.tails))
        device = backbone.vit.cls_token.device
        self.grid = grid
        fixed = backbone.positions(*grid, device)
        self.fixed_names = tuple(f"fixed_pos_{i}" for i in range(len(fixed)))
        for name, value in zip(self.fixed_names, fixed, strict=True):
            self.register_buffer(name, value.clone())

    def positions(self, rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in self.fixed_names)


class ExportGraph(nn.Module):
    """uint8 images at `size` -> (logits at `size`, head logits[, uint8 ids]): what is exported."""

    def __init__(self, model: SegmentationModel, size: tuple[int, int], argmax: bool) -> None:
        super().__init__()
        prep = model.preprocessing
        self.size = tuple(size)
        self.argmax = argmax
        grid = Preprocessing(size=self.size, patch_size=prep.patch_size).grid
        self.backbone = FixedGridBackbone(model.backbone, grid)
        self.head = model.head.eval()
        # exactly `preprocess.normalize`: (x - 255 mean) / (255 std) in float32
        self.register_buffer("mean", torch.tensor(prep.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(prep.std).view(1, 3, 1, 1) * 255.0)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = (images.float() - self.mean) / self.std
        head_logits = self.head(self.backbone(x)).float()
        logits = F.interpolate(head_logits, size=self.size, mode="bilinear", align_corners=False)
        if self.argmax:
            return logits, head_logits, logits.argmax(1).to(torch.uint8)
        return logits, head_logits


# ----------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    path: Path
    seconds: float
    bytes: int  # the .onnx file and its external data, if any
    size: tuple[int, int]
    batch: int | None  # None: dynamic
    outputs: tuple[str, ...]
    quantization: str

    def line(self) -> str:
        batch = "dynamic" if self.batch is None else self.batch
        q = "" if self.quantization == "none" else f", {self.quantization}"
        return (
            f"exported {self.path} ({self.bytes / 1e6:.1f} MB{q}) in {self.seconds:.1f} s: "
            f"uint8 images ({batch}, 3, {self.size[0]}, {self.size[1]}) -> "
            f"{', '.join(self.outputs)}"
        )


def _sample_input(batch: int | None, size: tuple[int, int]) -> torch.Tensor:
    # values do not matter; a batch of 2 keeps a dynamic batch from being specialised to 1
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch or 2, 3, *size), dtype=torch.uint8, generator=gen)


def _to_onnx_program(graph: ExportGraph, batch: int | None, outputs: tuple[str, ...]):
    sample = _sample_input(batch, graph.size)
    dynamic = None if batch is not None else {INPUT: {0: torch.export.Dim("batch", min=1)}}
    with warnings.catch_warnings():
        # torch.export and onnxscript warn about internals a user cannot act on
        warnings.simplefilter("ignore")
        return torch.onnx.export(
            graph,
            (sample,),
            dynamo=True,
            input_names=[INPUT],
            output_names=list(outputs),
            opset_version=OPSET,
            dynamic_shapes=dynamic,
            optimize=True,
            verbose=False,
        )


def _move_into_place(folder: Path, out: Path) -> int:
    """Move the files of a finished export from a scratch folder next to `out` into place
    (external data first, the .onnx last, so its presence means the export is complete).
    Returns their total size."""
    files = sorted(folder.iterdir(), key=lambda p: p.name == out.name)
    total = 0
    for f in files:
        total += f.stat().st_size
        os.replace(f, out.parent / f.name)
    return total


def _scratch(out: Path) -> Path:
    folder = temp_path(out)
    folder.mkdir(parents=True)
    return folder


def check_onnx(path: Path) -> None:
    """onnx.checker with shape inference, by path (models over 2 GB keep external data)."""
    onnx = require("onnx", "export")
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise OffroadSegError(f"{path}: the exported model fails onnx.checker: {e}") from e


def export_model(
    model: SegmentationModel,
    out: str | Path,
    *,
    size: tuple[int, int] | None = None,
    batch: int | None = 1,
    argmax: bool = False,
    quantize: str = "none",
) -> ExportResult:
    """Export `model` (any backbone variant and head) to `out` (.onnx) at `size` (rows, cols;
    default: the head's working size) for `batch` images per call (None: dynamic), then check
    it with onnx.checker. `quantize="dynamic"` writes an int8 model instead (see
    `quantize_dynamic_int8`). The model is exported on the CPU in float32."""
    require("onnx", "export")
    require("onnxscript", "export")
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 6):
        raise ConfigError(f"export needs torch 2.6 or later, not {torch.__version__}")
    if quantize not in QUANTIZE_MODES:
        raise ConfigError(f"quantize {quantize!r}: expected one of {', '.join(QUANTIZE_MODES)}")
    if batch is not None and batch < 1:
        raise ConfigError(f"batch {batch}: expected a positive number or dynamic")
    out = Path(out)
    size = tuple(size or model.preprocessing.size)
    check_size(size, model.preprocessing.patch_size)
    start = time.perf_counter()
    if model.device.type != "cpu":
        raise ConfigError("export runs on the CPU: build the model with device='cpu'")
    outputs = (*OUTPUTS, IDS) if argmax else OUTPUTS
    graph = ExportGraph(model, size, argmax).eval()
    program = _to_onnx_program(graph, batch, outputs)
    program.model.metadata_props.update(metadata(model.checkpoint, size, batch, outputs))
    for stale in remove_stale_temps(out.parent):  # a killed export's scratch folder
        log.info("removed %s, left by a killed export", stale)
    scratch = _scratch(out)
    try:
        fp32 = scratch / (out.name if quantize == "none" else f"fp32-{out.name}")
        program.save(str(fp32))
        if quantize == "dynamic":
            quantize_dynamic_int8(fp32, scratch / out.name)
            for f in scratch.glob("fp32-*"):  # the float model and its external data
                f.unlink()
        seal(scratch / out.name)
        check_onnx(scratch / out.name)
        nbytes = _move_into_place(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.perf_counter() - start
    quantization = "dynamic-int8" if quantize == "dynamic" else "none"
    return ExportResult(out, seconds, nbytes, size, batch, outputs, quantization)


def quantize_dynamic_int8(src: str | Path, dst: str | Path) -> None:
    """Quantise an exported float32 model `src` to `dst` with ONNX Runtime's dynamic
    quantisation: int8 weights of the MatMuls (per output channel), activations quantised to
    uint8 on the fly (per tensor). That is the transformer's linear layers, ~80% of the compute;
    attention's activation-by-activation products and the convolutions stay float32
    (ConvInteger is slow on CPU, and the heads are cheap). First ONNX Runtime's recommended
    pre-processing (shape inference, graph optimisation). metadata_props are kept, with
    `quantization` set to 'dynamic-int8'."""
    onnx = require("onnx", "export --quantize")
    quantization = require("onnxruntime.quantization", "export --quantize")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    prepared = dst.with_name(f".prepared-{dst.name}")
    # ViT-L and ViT-g exceed protobuf's 2 GB in float32: their weights stay external
    large = sum(f.stat().st_size for f in src.parent.glob(f"{src.name}*")) > 1_800_000_000
    try:
        quant_pre_process(str(src), str(prepared), save_as_external_data=large)
        quantization.quantize_dynamic(
            str(prepared),
            str(dst),
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=quantization.QuantType.QInt8,
        )
    finally:
        for f in dst.parent.glob(f"{prepared.name}*"):
            f.unlink()
    model = onnx.load(str(dst))
    for prop in model.metadata_props:
        if prop.key == "quantization":
            prop.value = "dynamic-int8"
    onnx.save(model, str(dst))
    seal(dst)  # new weights: a new digest


def export(cfg: ExportConfig) -> ExportResult:
    """`offroad-seg export`: a head checkpoint -> one .onnx graph."""
    if cfg.out.suffix != ".onnx":
        raise ConfigError(f"{cfg.out}: the exported model's name must end in .onnx")
    if cfg.out.exists() and not cfg.overwrite:
        raise OffroadSegError(f"{cfg.out}: already exists; use --overwrite to replace it")
    head = resolve_head(cfg.head)
    if head.suffix.lower() == ".onnx":
        raise ConfigError(f"{head}: already an exported model; export reads a .pth head")
    ckpt = load_checkpoint(head)
    model = SegmentationModel.from_checkpoint(ckpt, cfg.weights, "cpu")
    return export_model(
        model,
        cfg.out,
        size=cfg.size,
        batch=cfg.batch,
        argmax=cfg.argmax,
        quantize=cfg.quantize,
    )
