"""The exported ONNX model's contract, which `export.py` writes and the onnxruntime engine
(`engines.py`) reads: the input and output names, the metadata_props keys (`METADATA`) and
`checkpoint_from_onnx` that reads them back as a `HeadCheckpoint`, the weights digest that seals
a model at export and is verified when it is loaded, and `require` for the optional packages of
the `export` extra. Below both, so neither has to import the other for it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from offroad_seg import __version__
from offroad_seg.data.classes import ClassMap
from offroad_seg.errors import ConfigError, OffroadSegError
from offroad_seg.models.backbone import BackboneSpec
from offroad_seg.models.checkpoint import HeadCheckpoint, file_sha256
from offroad_seg.models.heads import HeadConfig
from offroad_seg.models.preprocess import Preprocessing

log = logging.getLogger(__name__)


FORMAT = "offroad-seg-onnx"
VERSION = 1
INPUT = "images"
LOGITS, HEAD_LOGITS, IDS = "logits", "head_logits", "ids"
OUTPUTS = (LOGITS, HEAD_LOGITS)
EXTRA_HINT = "pip install 'offroad-seg[export]'"

# metadata_props: every value a string; structured values are JSON
METADATA = {
    "format": f"{FORMAT!r}",
    "format_version": "this format's version (1)",
    "class_map": "JSON list of {code, name, color} in class-id order",
    "preprocessing": "JSON: size [rows, cols], mean, std (of 0..1 RGB), resize, patch_size",
    "backbone": "JSON: name, arch, weights_sha256, weights_source, layers, channels",
    "head_config": "JSON: the head's settings (name, width, depth, ...; an ensemble: its first's)",
    "ensemble": "JSON list of an ensemble's members' head settings ([] for a single head)",
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


# ----------------------------------------------------------------------------- writing


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
        "ensemble": json.dumps([c.to_dict() for c in ckpt.members]),
        # the blocks a head (or each member) tuned, LoRA merged into the graph's weights
        "tuning": json.dumps(ckpt.payload.get("tuning")),
        "member_tuning": json.dumps([e.get("tuning") for e in ckpt.payload.get("ensemble", [])]),
        "tool_version": __version__,
        "torch_version": torch.__version__,
    }
    return props


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
            k: json.loads(v) if k in ("class_map", "preprocessing", "backbone", "head_config",
                                      "ensemble", "tuning", "member_tuning")
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
            members=tuple(HeadConfig.from_dict(c) for c in payload.get("ensemble", ())),
        )
    except (KeyError, ValueError, OffroadSegError) as e:
        raise OffroadSegError(f"{path}: unreadable offroad-seg metadata ({e})") from e
