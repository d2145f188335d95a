"""ONNX export and the onnxruntime engine: the exported graph computes what the torch model
computes, for every head and more than one backbone variant, from the CLI and the API.

Backbones here are random but "active": timm initialises DINOv2's layer scales to 1e-5, which
makes every block of a random backbone nearly the identity, so a parity test on it would not
see the transformer at all (a broken attention export would pass). Layer scales drawn from
U(0.1, 1) and 4x larger qkv weights (peaked attention) make each block change the features as
much as trained blocks do.
"""

import importlib
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from offroad_seg.cli import cli
from offroad_seg.data.classes import ClassMap
from offroad_seg.data.dataset import list_samples
from offroad_seg.data.images import read_mask
from offroad_seg.errors import ConfigError, OffroadSegError
from offroad_seg.inference.engines import LOGIT_TOLERANCE, OnnxEngine, build_engine, load_head
from offroad_seg.inference.evaluate import EvalConfig, evaluate
from offroad_seg.inference.export import export_model, quantize_dynamic_int8
from offroad_seg.inference.onnx_model import METADATA, checkpoint_from_onnx
from offroad_seg.models.backbone import Backbone, BackboneSpec, create_vit, load_backbone
from offroad_seg.models.checkpoint import (
    HeadCheckpoint,
    head_payload,
    load_checkpoint,
    save_checkpoint,
)
from offroad_seg.models.heads import HeadConfig, build_head, head_names
from offroad_seg.models.preprocess import Preprocessing, resize_image
from offroad_seg.models.segmentation import TTA, SegmentationModel
from offroad_seg.models.variants import get_variant
from offroad_seg.models.weights import state_dict_sha256
from tests.conftest import SIZE, doc_python


def _extra(module: str):
    """A package of the [export] extra. It is in [dev], so CI (CI set) runs these tests and
    fails on a missing package; elsewhere they are skipped without it."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


onnx = _extra("onnx")
ort = _extra("onnxruntime")
_extra("onnxscript")

AGREEMENT = 0.999  # masks of the two engines agree on at least this share of pixels


def active_vit(name: str, depth: int | None = None, seed: int = 0) -> torch.nn.Module:
    """A random timm ViT of a variant whose blocks matter (see the module docstring). Built on
    the meta device and filled here: timm's truncated-normal initialisation of a full ViT takes
    seconds on two cores."""
    with torch.device("meta"):
        vit = create_vit(get_variant(name), depth)
    vit.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in vit.named_parameters():
            if key.endswith("gamma"):
                param.uniform_(0.1, 1.0, generator=gen)
            elif "norm" in key:
                param.fill_(1.0 if key.endswith("weight") else 0.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
        for block in vit.blocks:
            block.attn.qkv.weight.mul_(4)
    return vit.eval()


def save_weights(vit: torch.nn.Module, path) -> str:
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
    return str(path)


def make_head(path, backbone: Backbone, head: str = "convnext", seed: int = 0) -> HeadCheckpoint:
    """A head checkpoint (random head) on `backbone` at the test working size."""
    cfg = HeadConfig(name=head, in_channels=backbone.spec.channels)
    torch.manual_seed(seed)
    module = build_head(cfg)
    prep = Preprocessing(size=SIZE)
    payload = head_payload(
        cfg, ClassMap.default(), backbone.spec, prep, state_dict=module.state_dict()
    )
    save_checkpoint(path, payload)
    return load_checkpoint(path)


def truncated_model(
    folder, name: str, depth: int, head: str, seed: int = 0, layers: int = 1
) -> SegmentationModel:
    """A `depth`-block random backbone of variant `name` and a random head (quick to export)."""
    vit = active_vit(name, depth=depth, seed=seed)
    spec = BackboneSpec(state_dict_sha256(vit.state_dict()), "random-active", layers, name)
    backbone = Backbone(vit, spec)
    ckpt = make_head(folder / "head.pth", backbone, head, seed=seed + 1)
    return SegmentationModel(backbone, ckpt.build(), ckpt)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the logit range, as `LOGIT_TOLERANCE` is defined."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return ((a - b).abs().max() / max(1.0, a.abs().max().item())).item()


def upsample(logits: torch.Tensor, size=SIZE) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def agreement(a, b) -> float:
    return float((np.asarray(a) == np.asarray(b)).mean())


@pytest.fixture(scope="module")
def vits(tmp_path_factory):
    """ViT-S/14 (active random weights in a file) + a convnext head: the checkpoint, the torch
    model and its export by the CLI (`--batch dynamic`)."""
    root = tmp_path_factory.mktemp("vits")
    weights = save_weights(active_vit("dinov2_vits14"), root / "vits14.safetensors")
    backbone = load_backbone(weights, name="dinov2_vits14")
    ckpt = make_head(root / "head.pth", backbone)
    onnx_path = root / "model.onnx"
    r = CliRunner().invoke(cli, ["export", str(ckpt.path), str(onnx_path), "--batch", "dynamic"])
    assert r.exit_code == 0, r.output
    assert "exported" in r.output and onnx_path.is_file()
    model = SegmentationModel.from_checkpoint(ckpt.path, None, "cpu")
    return {"ckpt": ckpt, "model": model, "onnx": onnx_path, "weights": weights}


def test_onnxruntime_logits_equal_torch_logits(vits, images):
    model, engine = vits["model"], OnnxEngine(vits["onnx"])
    assert engine.providers == ["CPUExecutionProvider"] and engine.batch is None
    for tta in ("none", "flip"):
        expected, got = model.logits(images, tta), engine.logits(images, tta)
        assert got.shape == expected.shape == (3, 11, SIZE[0] // 14, SIZE[1] // 14)
        assert got.dtype == torch.float32
        assert relative_error(expected, got) < LOGIT_TOLERANCE
        masks = upsample(expected).argmax(1), upsample(got).argmax(1)
        assert agreement(*masks) >= AGREEMENT
    # flipping is not a no-op here, so the comparison above did test it
    assert relative_error(model.logits(images), model.logits(images, "flip")) > 1e-3


def test_graph_outputs_are_logits_at_the_input_size(vits, images):
    session = ort.InferenceSession(str(vits["onnx"]), providers=["CPUExecutionProvider"])
    logits, head_logits = session.run(["logits", "head_logits"], {"images": images.numpy()})
    expected = vits["model"].logits(images)
    assert relative_error(expected, head_logits) < LOGIT_TOLERANCE
    assert logits.shape == (3, 11, *SIZE)
    assert relative_error(upsample(expected), logits) < LOGIT_TOLERANCE
    assert agreement(upsample(expected).argmax(1), logits.argmax(1)) >= AGREEMENT


def test_dynamic_batch_runs_one_and_three_images(vits, images):
    session = ort.InferenceSession(str(vits["onnx"]), providers=["CPUExecutionProvider"])
    graph_input = session.get_inputs()[0]
    assert graph_input.type == "tensor(uint8)" and graph_input.shape == ["batch", 3, *SIZE]
    three = session.run(["head_logits"], {"images": images.numpy()})[0]
    ones = [
        session.run(["head_logits"], {"images": images[i : i + 1].numpy()})[0] for i in range(3)
    ]
    assert three.shape[0] == 3 and all(o.shape[0] == 1 for o in ones)
    assert relative_error(three, np.concatenate(ones)) < LOGIT_TOLERANCE


def test_checker_passes_and_metadata_round_trips(vits):
    onnx.checker.check_model(str(vits["onnx"]), full_check=True)
    ckpt = vits["ckpt"]
    # what a user without this package reads
    meta = ort.InferenceSession(str(vits["onnx"])).get_modelmeta().custom_metadata_map
    assert set(METADATA) <= set(meta)
    assert meta["format"] == "offroad-seg-onnx" and meta["format_version"] == "1"
    assert json.loads(meta["class_map"]) == ClassMap.default().to_dict()
    prep = json.loads(meta["preprocessing"])
    assert prep["size"] == list(SIZE) and prep["mean"] == [0.485, 0.456, 0.406]
    assert prep["resize"] == "bilinear-antialias-uint8"
    backbone = json.loads(meta["backbone"])
    assert backbone["name"] == "dinov2_vits14"
    assert backbone["weights_sha256"] == ckpt.backbone.weights_sha256
    assert json.loads(meta["head_config"]) == ckpt.head_config.to_dict()
    assert meta["batch"] == "dynamic" and meta["outputs"] == "logits,head_logits"
    assert meta["quantization"] == "none" and meta["tool_version"]
    assert meta["source_sha256"] and meta["source"] == str(ckpt.path)
    # and what evaluate and predict read back
    back = checkpoint_from_onnx(vits["onnx"])
    assert back.path == vits["onnx"]
    assert back.head_config == ckpt.head_config and back.class_map == ckpt.class_map
    assert back.backbone == ckpt.backbone and back.preprocessing == ckpt.preprocessing
    assert back.compat_fingerprint == ckpt.compat_fingerprint
    assert load_head(vits["onnx"]).compat_fingerprint == ckpt.compat_fingerprint


@pytest.mark.parametrize("head", head_names())
def test_every_head_exports_with_a_fixed_batch_and_ids(head, images, tmp_path):
    """A one-block ViT-S keeps this quick; fixed batch 2 with 3 images exercises the engine's
    split-and-pad path, and `ids` is the graph's own argmax."""
    model = truncated_model(tmp_path, "dinov2_vits14", 1, head, seed=1)
    ckpt = model.checkpoint
    result = export_model(model, tmp_path / "m.onnx", batch=2, argmax=True)
    assert result.outputs == ("logits", "head_logits", "ids") and result.batch == 2
    engine = OnnxEngine(tmp_path / "m.onnx")
    assert engine.batch == 2
    expected, got = model.logits(images), engine.logits(images)
    scale = ckpt.head_config.spec.output_scale
    assert got.shape == (3, 11, SIZE[0] // 14 * scale, SIZE[1] // 14 * scale)
    assert relative_error(expected, got) < LOGIT_TOLERANCE
    session = engine.session
    logits, ids = session.run(["logits", "ids"], {"images": images[:2].numpy()})
    assert ids.dtype == np.uint8 and ids.shape == (2, *SIZE)
    np.testing.assert_array_equal(ids, logits.argmax(1))
    assert agreement(upsample(expected[:2]).argmax(1), ids) >= AGREEMENT


def test_ensemble_exports_as_one_graph(images, tmp_path):
    """Two members (token-grid and x4 heads) on one one-block ViT-S: one graph, the backbone
    once, the averaged probabilities' log as logits."""
    from offroad_seg.models.ensemble import write_ensemble

    first = truncated_model(tmp_path, "dinov2_vits14", 1, "convnext", seed=1)
    second = make_head(tmp_path / "b.pth", first.backbone, "upnext", seed=7)
    ens = write_ensemble([first.checkpoint.path, second.path], tmp_path / "ens.pth")
    model = SegmentationModel(first.backbone, ens.build(), ens)
    export_model(model, tmp_path / "e.onnx", batch=None)
    assert checkpoint_from_onnx(tmp_path / "e.onnx").members == ens.members
    expected, got = model.logits(images), OnnxEngine(tmp_path / "e.onnx").logits(images)
    assert got.shape == (3, 11, SIZE[0] // 14 * 4, SIZE[1] // 14 * 4)
    assert relative_error(expected, got) < LOGIT_TOLERANCE
    assert agreement(upsample(expected).argmax(1), upsample(got).argmax(1)) >= AGREEMENT


@pytest.mark.parametrize(
    ("name", "depth", "head", "layers"),
    [("dinov2_vitb14_reg", 2, "pyramid", 2), ("dinov2_vitg14", 1, "linear", 1)],
)
def test_other_variants_export(name, depth, head, layers, images, tmp_path):
    """ViT-B/14 with registers (another width and head count, register tokens, the
    antialiased position-embedding resize) with two layers' features into the pyramid head,
    and ViT-g/14 (SwiGLU MLP), truncated to keep this quick."""
    model = truncated_model(tmp_path, name, depth, head, seed=3, layers=layers)
    export_model(model, tmp_path / "m.onnx", batch=None)
    engine = OnnxEngine(tmp_path / "m.onnx")
    for tta in ("none", "flip"):
        expected, got = model.logits(images, tta), engine.logits(images, tta)
        assert relative_error(expected, got) < LOGIT_TOLERANCE
        assert agreement(upsample(expected).argmax(1), upsample(got).argmax(1)) >= AGREEMENT
    meta = engine.session.get_modelmeta().custom_metadata_map
    backbone = json.loads(meta["backbone"])
    assert backbone["name"] == name and backbone["layers"] == layers


def predict_cli(head, inputs, out, *extra):
    r = CliRunner().invoke(
        cli, ["predict", str(head), str(inputs), str(out), "--workers", "0", *extra]
    )
    assert r.exit_code == 0, r.output
    return json.loads((out / "predictions.json").read_text())


def assert_cli_masks_match_segmenter_and_onnx(head, val, torch_out, onnx_out) -> None:
    """`predict`'s masks of `head` (in `torch_out`) equal `Segmenter`'s, and those of its
    export (`onnx_out`) agree on >= AGREEMENT of the pixels; the masks hold more than one
    class (masks of one class would agree whatever the model computed)."""
    from offroad_seg.api import Segmenter

    seg = Segmenter.from_checkpoint(head, device="cpu")
    classes = set()
    for sample in list_samples(val):
        torch_cli = read_mask(torch_out / "masks" / sample.name)
        onnx_cli = read_mask(onnx_out / "masks" / sample.name)
        np.testing.assert_array_equal(seg.predict(sample.image).codes, torch_cli)
        assert (torch_cli == onnx_cli).mean() >= AGREEMENT
        classes |= set(np.unique(torch_cli).tolist())
    assert len(classes) > 1


def assert_same_masks(a, b, dataset):
    for s in list_samples(dataset / "val"):
        left, right = read_mask(a / "masks" / s.name), read_mask(b / "masks" / s.name)
        assert left.shape == right.shape == (112, 196)
        assert agreement(left, right) >= AGREEMENT
        colors = [np.asarray(Image.open(d / "masks_color" / s.name).convert("RGB")) for d in (a, b)]
        assert agreement(*colors) >= AGREEMENT


def test_cli_predict_with_the_exported_model_writes_the_same_masks(vits, dataset, tmp_path):
    torch_run = predict_cli(vits["ckpt"].path, dataset / "val", tmp_path / "t")
    onnx_run = predict_cli(vits["onnx"], dataset / "val", tmp_path / "o", "--tta", "none")
    assert torch_run["engine"] == "torch" and onnx_run["engine"] == "onnxruntime"
    assert onnx_run["classes"] == torch_run["classes"]
    assert_same_masks(tmp_path / "t", tmp_path / "o", dataset)


def test_cli_predict_engine_onnxruntime_exports_a_pth_head(dataset, tmp_path, monkeypatch):
    """The other variant end to end from the CLI: ViT-S/14 with registers, full depth. The
    export is scratch: none is left in TMPDIR, and a killed run's (its pid dead) is removed
    while a running one's is not."""
    import tempfile

    from offroad_seg.core.atomic import host_tag
    from offroad_seg.inference.engines import SCRATCH_PREFIX
    from tests.guarantees.test_guard_infer import dead_pid

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # gettempdir() caches its answer
    killed = tmp / f"{SCRATCH_PREFIX}{host_tag()}-{dead_pid()}-k1ll3d_x"
    (killed / "model.onnx").parent.mkdir()
    (killed / "model.onnx").write_bytes(b"87 MB, in real life")
    running = tmp / f"{SCRATCH_PREFIX}{host_tag()}-{os.getpid()}-running"
    running.mkdir()

    weights = save_weights(active_vit("dinov2_vits14_reg", seed=4), tmp_path / "reg.safetensors")
    ckpt = make_head(tmp_path / "head.pth", load_backbone(weights, name="dinov2_vits14_reg"))
    predict_cli(ckpt.path, dataset / "val", tmp_path / "t", "--engine", "torch")
    run = predict_cli(ckpt.path, dataset / "val", tmp_path / "o", "--engine", "onnxruntime")
    assert run["engine"] == "onnxruntime"
    assert_same_masks(tmp_path / "t", tmp_path / "o", dataset)
    ours = [name for name in os.listdir(tmp) if name.startswith(SCRATCH_PREFIX)]
    assert ours == [running.name]  # the killed run's and this run's are gone


def test_evaluate_with_onnxruntime_matches_torch(vits, dataset, tmp_path):
    def run(head, out, **kw):
        data = dataset / "val"
        return evaluate(EvalConfig(head, data, out, workers=0, progress=False, comparisons=0, **kw))

    a = run(vits["ckpt"].path, tmp_path / "t")
    b = run(vits["onnx"], tmp_path / "o")
    report = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert report["engine"] == "onnxruntime" and report["head"] == str(vits["onnx"])
    assert report["backbone"] == vits["ckpt"].backbone.to_dict()
    assert json.loads((tmp_path / "t" / "metrics.json").read_text())["engine"] == "torch"
    pixels = a.metrics.confusion.sum()
    assert b.metrics.confusion.sum() == pixels
    # each disagreeing pixel moves one count out of one cell and into another
    assert np.abs(a.metrics.confusion - b.metrics.confusion).sum() / 2 <= (1 - AGREEMENT) * pixels
    assert b.metrics.loss == pytest.approx(a.metrics.loss, rel=1e-4)


def test_quantize_dynamic_is_smaller_and_mostly_agrees(vits, images, tmp_path):
    quantize_dynamic_int8(vits["onnx"], tmp_path / "q.onnx")
    assert (tmp_path / "q.onnx").stat().st_size < 0.4 * vits["onnx"].stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    graph = onnx.load(str(tmp_path / "q.onnx"))
    assert any(
        n.op_type == "DynamicQuantizeMatMul" or "Integer" in n.op_type for n in graph.graph.node
    )
    engine = OnnxEngine(tmp_path / "q.onnx")
    assert engine.checkpoint.payload["quantization"] == "dynamic-int8"
    expected = upsample(OnnxEngine(vits["onnx"]).logits(images)).argmax(1)
    got = upsample(engine.logits(images)).argmax(1)
    # int8 is an approximation: measured 0.98-0.99 on these random weights (see docs/performance.md)
    assert 0.9 <= agreement(expected, got) < 1.0


def test_export_at_another_size_quantized_writes_one_model(images, tmp_path):
    model = truncated_model(tmp_path, "dinov2_vits14", 1, "linear")
    out = tmp_path / "out" / "q.onnx"
    result = export_model(model, out, size=(42, 84), quantize="dynamic")
    assert result.quantization == "dynamic-int8" and "dynamic-int8" in result.line()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["q.onnx"]
    engine = OnnxEngine(out)
    assert engine.checkpoint.payload["quantization"] == "dynamic-int8" and engine.batch == 1
    # the exported size is the model's working size: evaluate and predict resize to it
    assert engine.preprocessing.size == (42, 84)
    assert engine.session.get_inputs()[0].shape == [1, 3, 42, 84]
    small = resize_image(images, engine.preprocessing)
    assert engine.logits(small).shape == (3, 11, 3, 6)


def test_multi_scale_tta_runs_one_session_per_size(images, tmp_path):
    """--tta-scales with the onnxruntime engine: a graph per size, the same passes as torch."""
    model = truncated_model(tmp_path, "dinov2_vits14", 1, "linear")
    tta = TTA.of("flip", (0.5, 1.0))
    (small,) = tta.extra_sizes(model.preprocessing)
    export_model(model, tmp_path / "a.onnx", batch=None)
    export_model(model, tmp_path / "b.onnx", size=small, batch=None)
    engine = OnnxEngine(tmp_path / "a.onnx", model.checkpoint)
    engine.add_session(tmp_path / "b.onnx")
    scaled = [resize_image(images, Preprocessing(size=small))]
    expected, got = model.tta_logits(images, scaled, tta), engine.tta_logits(images, scaled, tta)
    assert [g.shape for g in got] == [e.shape for e in expected]
    assert expected[0].shape[-2:] != expected[1].shape[-2:]  # both sizes really ran
    for e, g in zip(expected, got, strict=True):
        assert relative_error(e, g) < LOGIT_TOLERANCE


def test_refusals_are_one_line(vits, dataset, tmp_path):
    def fails(args) -> str:
        r = CliRunner().invoke(cli, args)
        assert r.exit_code != 0
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 or r.exit_code == 2, r.output  # 2: click's usage errors
        return r.output

    onnx_path, pth = str(vits["onnx"]), str(vits["ckpt"].path)
    out = str(tmp_path / "p")
    val = str(dataset / "val")
    assert "runs with --engine onnxruntime" in fails(
        ["predict", onnx_path, val, out, "--engine", "torch"]
    )
    assert "holds its backbone weights" in fails(
        ["predict", onnx_path, val, out, "--weights", "random"]
    )
    assert "already exists" in fails(["export", pth, onnx_path])
    assert "must end in .onnx" in fails(["export", pth, str(tmp_path / "m.pth")])
    assert "already an exported model" in fails(["export", onnx_path, str(tmp_path / "x.onnx")])
    assert "positive number or 'dynamic'" in fails(
        ["export", pth, str(tmp_path / "x.onnx"), "--batch", "0"]
    )
    assert "exported for 56x98 images only" in fails(
        ["predict", onnx_path, val, out, "--tta-scales", "0.5,1"]
    )
    assert not (tmp_path / "p").exists()
    # an ONNX model this tool did not write
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [x])
    graph.output[0].name = "y"
    onnx.save(onnx.helper.make_model(graph), tmp_path / "other.onnx")
    assert "not an offroad-seg export" in fails(["predict", str(tmp_path / "other.onnx"), val, out])
    # images at another size than the graph's
    with pytest.raises(ConfigError, match="expects uint8 images"):
        OnnxEngine(vits["onnx"]).logits(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
    with pytest.raises(OffroadSegError, match="exported model runs with"):
        build_engine("torch", load_head(vits["onnx"]))


def test_docs_onnx_runtime_example_runs_without_the_package(tiny_demo, tmp_path, monkeypatch):
    """docs/deploy.md's ten lines of ONNX Runtime, on the demo's head exported by the CLI: the mask
    agrees with the one the demo's evaluate wrote (PIL's resize rounds differently)."""
    code = doc_python("docs/deploy.md", "## Running an export with ONNX Runtime alone")
    assert "offroad_seg" not in code and "torch" not in code
    demo = tiny_demo / "offroad-seg-demo"
    head = demo / "head" / "segmentation_head.pth"
    r = CliRunner().invoke(cli, ["export", str(head), str(tmp_path / "model.onnx")])
    assert r.exit_code == 0, r.output
    image = sorted((demo / "data" / "val" / "Color_Images").glob("*.png"))[0]
    (tmp_path / "frame.png").write_bytes(image.read_bytes())
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "docs/deploy.md", "exec"), namespace)
    written = read_mask(demo / "predictions" / "masks" / image.name)
    assert namespace["mask"].shape == written.shape and namespace["mask"].dtype == np.uint16
    assert agreement(namespace["mask"], written) >= 0.99
