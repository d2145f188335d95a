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
model's metadata_props describe everything a user needs without this package (see `METADATA`),
and `checkpoint_from_onnx` turns them back into a `HeadCheckpoint` for evaluate and predict.

Exporter: the torch.export-based one (`torch.onnx.export(dynamo=True)`). The TorchScript-based
exporter is deprecated since torch 2.9 and cannot export the pyramid head (its adaptive average
pooling to grids that do not divide the token grid); the dynamo exporter exports every head and
backbone variant, and writes a smaller, cleaner graph (no Identity/Constant chains, fused GELU
patterns ONNX Runtime recognises). It is slower (~7 s instead of ~1 s for ViT-S/14), once.
Opset 18 is the lowest it emits: the widest runtime support (TensorRT 8.6 and later, ONNX Runtime
1.14 and later); opset 23's fused Attention op ran about 2x slower in ONNX Runtime 1.32 on CPU.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from offroad_seg import __version__
from offroad_seg.config import ExportConfig
from offroad_seg.core.atomic import remove_stale_temps, temp_path
from offroad_seg.data.classes import ClassMap
from offroad_seg.errors import ConfigError, OffroadSegError
from offroad_seg.models.backbone import Backbone, BackboneSpec
from offroad_seg.models.checkpoint import HeadCheckpoint, file_sha256, load_checkpoint
from offroad_seg.models.heads import HeadConfig
from offroad_seg.models.preprocess import Preprocessing, check_size
from offroad_seg.models.segmentation import SegmentationModel

log = logging.getLogger(__name__)

FORMAT = "offroad-seg-onnx"
VERSION = 1
OPSET = 18
INPUT = "images"
LOGITS, HEAD_LOGITS, IDS = "logits", "head_logits", "ids"
OUTPUTS = (LOGITS, HEAD_LOGITS)
QUANTIZE_MODES = ("none", "dynamic")
EXTRA_HINT = "pip install 'offroad-seg[export]'"

# metadata_props: every value a string; structured values are JSON
METADATA = {
    "format": f"{FORMAT!r}",
    "format_version": "this format's version (1)",
    "class_map": "JSON list of {code, name, color} in class-id order",
    "preprocessing": "JSON: size [rows, cols], mean, std (of 0..1 RGB), resize, patch_size",
    "backbone": "JSON: name, arch, weights_sha256, weights_source, layers, channels",
    "head_config": "JSON: the head's settings (name, width, depth, ...)",
    "compat_fingerprint": "the head's backbone/preprocessing/class-map fingerprint",
    "batch": "'dynamic' or the fixed batch size",
    "outputs": "comma-separated output names",
    "quantization": "'none' or 'dynamic-int8'",
    "source": "the head checkpoint exported",
    "source_sha256": "sha256 of that file",
    "tool_version": "offroad-seg version",
    "torch_version": "PyTorch version that exported it",
    "weights_sha256": "sha256 of the model without this entry (graph, weights, every other "
    "entry) and of its external data files: checked when the model is loaded",
}
DIGEST = "weights_sha256"


def require(module: str, what: str) -> Any:
    """Import an optional dependency of the `export` extra, or fail with one line."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{what} needs the {module} package: {EXTRA_HINT}") from None


# ----------------------------------------------------------------------------- the graph


class FixedGridBackbone(Backbone):
    """The backbone with its position information computed once, for one token grid, and held
    as buffers (DINOv2: the resized position embeddings; DINOv3: the rotary sines and cosines):
    exporters see shapes symbolically, so the per-grid cache of `Backbone` cannot be looked up
    while tracing, and the antialiased bicubic resize of the DINOv2 register variants has no
    ONNX equivalent. The forward pass is `Backbone.forward`, unchanged."""

    def __init__(self, backbone: Backbone, grid: tuple[int, int]) -> None:
        super().__init__(backbone.vit, backbone.spec)
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


def metadata(
    ckpt: HeadCheckpoint,
    size: tuple[int, int],
    batch: int | None,
    outputs: tuple[str, ...],
) -> dict[str, str]:
    """The metadata_props of an exported float32 model (see `METADATA`)."""
    prep = Preprocessing(
        size=size,
        mean=ckpt.preprocessing.mean,
        std=ckpt.preprocessing.std,
        patch_size=ckpt.preprocessing.patch_size,
    )  # the exported size; resize, normalisation and patch as the head was trained
    source = Path(ckpt.path)
    props = {
        "format": FORMAT,
        "format_version": str(VERSION),
        "class_map": json.dumps(ckpt.class_map.to_dict()),
        "preprocessing": json.dumps(prep.to_dict()),
        "backbone": json.dumps(ckpt.backbone.to_dict()),
        "head_config": json.dumps(ckpt.head_config.to_dict()),
        "compat_fingerprint": ckpt.compat_fingerprint,
        "batch": "dynamic" if batch is None else str(batch),
        "outputs": ",".join(outputs),
        "quantization": "none",  # quantize_dynamic_int8 sets it
        "source": str(source),
        "source_sha256": file_sha256(source) if source.is_file() else "",
        "tool_version": __version__,
        "torch_version": torch.__version__,
    }
    return props


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


# ----------------------------------------------------------------------------- integrity


def _digest(model, folder: Path) -> str:
    """sha256 of `model` (an onnx ModelProto, external data not loaded) without its digest
    entry, then of each external data file it names (its bytes are not in the proto).
    Removes the digest entry from `model`."""
    import hashlib

    from onnx import TensorProto

    kept = [p for p in model.metadata_props if p.key != DIGEST]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    h = hashlib.sha256(model.SerializeToString(deterministic=True))
    locations = sorted(
        {
            entry.value
            for tensor in model.graph.initializer
            if tensor.data_location == TensorProto.EXTERNAL
            for entry in tensor.external_data
            if entry.key == "location"
        }
    )
    for location in locations:
        h.update(location.encode())
        with open(folder / location, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _load_proto(path: Path):
    onnx = require("onnx", "an exported .onnx head")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise OffroadSegError(f"{path}: cannot read ONNX model ({type(e).__name__})") from e


def seal(path: str | Path) -> None:
    """Store the model's digest (see `METADATA['weights_sha256']`) in its metadata."""
    onnx = require("onnx", "export")
    path = Path(path)
    model = _load_proto(path)
    digest = _digest(model, path.parent)
    model.metadata_props.add(key=DIGEST, value=digest)
    onnx.save(model, str(path))


def verify_weights(path: str | Path) -> None:
    """Refuse, in one line, an exported model whose graph, weights or metadata changed after
    export (the digest `seal` stored no longer matches). A model exported before digests
    existed loads with a warning."""
    path = Path(path)
    model = _load_proto(path)
    stored = next((p.value for p in model.metadata_props if p.key == DIGEST), None)
    if stored is None:
        log.warning(
            "%s: holds no weights digest (exported by an older offroad-seg), so its weights "
            "cannot be checked; export it again to add one",
            path,
        )
        return
    try:
        actual = _digest(model, path.parent)
    except OSError as e:
        raise OffroadSegError(f"{path}: cannot read its external data ({e})") from e
    if actual != stored:
        raise OffroadSegError(
            f"{path}: its graph, weights or metadata do not match the digest stored at export (the "
            "file was modified or corrupted); export the head again"
        )


def export(cfg: ExportConfig) -> ExportResult:
    """`offroad-seg export`: a head checkpoint -> one .onnx graph."""
    if cfg.out.suffix != ".onnx":
        raise ConfigError(f"{cfg.out}: the exported model's name must end in .onnx")
    if cfg.out.exists() and not cfg.overwrite:
        raise OffroadSegError(f"{cfg.out}: already exists; use --overwrite to replace it")
    if str(cfg.head).endswith(".onnx"):
        raise ConfigError(f"{cfg.head}: already an exported model; export reads a .pth head")
    ckpt = load_checkpoint(cfg.head)
    model = SegmentationModel.from_checkpoint(ckpt, cfg.weights, "cpu")
    return export_model(
        model,
        cfg.out,
        size=cfg.size,
        batch=cfg.batch,
        argmax=cfg.argmax,
        quantize=cfg.quantize,
    )


# ----------------------------------------------------------------------------- reading


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an exported model (without loading its weights)."""
    onnx = require("onnx", "an exported .onnx head")
    path = Path(path)
    if not path.is_file():
        raise OffroadSegError(f"{path}: exported model not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise OffroadSegError(f"{path}: cannot read ONNX model ({type(e).__name__})") from e
    props = {p.key: p.value for p in model.metadata_props}
    if props.get("format") != FORMAT:
        raise OffroadSegError(
            f"{path}: not an offroad-seg export (no {FORMAT!r} metadata); "
            "make one with `offroad-seg export`"
        )
    if props.get("format_version") != str(VERSION):
        raise OffroadSegError(
            f"{path}: export format version {props.get('format_version')}; "
            f"this tool reads {VERSION}"
        )
    return props


def checkpoint_from_onnx(path: str | Path) -> HeadCheckpoint:
    """What an exported model was made from, as a `HeadCheckpoint` without weights (the
    weights are in the graph): class map, preprocessing at the exported size, backbone spec
    and head config. Its payload is the parsed metadata."""
    path = Path(path)
    props = read_metadata(path)
    try:
        payload: dict[str, Any] = {
            k: json.loads(v) if k in ("class_map", "preprocessing", "backbone", "head_config")
            else v
            for k, v in props.items()
        }  # fmt: skip
        return HeadCheckpoint(
            path=path,
            head_config=HeadConfig.from_dict(payload["head_config"]),
            class_map=ClassMap.from_dict(payload["class_map"]),
            backbone=BackboneSpec.from_dict(payload["backbone"]),
            preprocessing=Preprocessing.from_dict(payload["preprocessing"]),
            payload=payload,
        )
    except (KeyError, ValueError, OffroadSegError) as e:
        raise OffroadSegError(f"{path}: unreadable offroad-seg metadata ({e})") from e
