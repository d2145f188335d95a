"""The Python API: `Segmenter` gives exactly the CLI's masks, and the examples of README and
docs/python-api.md run as written."""

from __future__ import annotations

import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import offroad_seg
from offroad_seg import Segmenter
from offroad_seg.cli import cli
from offroad_seg.data.dataset import list_samples
from offroad_seg.data.images import read_mask
from offroad_seg.training.loop import TrainConfig, train
from tests.conftest import doc_python


@pytest.fixture(scope="module")
def head(caches, tmp_path_factory):
    out = tmp_path_factory.mktemp("api-head")
    cfg = TrainConfig(
        caches=(caches["train"],), out=out, epochs=2, batch_size=2, progress=False, device="cpu"
    )
    train(cfg)
    return out / "segmentation_head.pth"


def test_segmenter_equals_cli_predict(head, dataset, tmp_path):
    out = tmp_path / "pred"
    images = dataset / "val" / "Color_Images"
    args = ["predict", str(head), str(images), str(out), "--workers", "0", "--device", "cpu"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    seg = Segmenter.from_checkpoint(head, device="cpu")
    samples = list_samples(dataset / "val")
    from_paths = seg.predict_many([s.image for s in samples], logits=True)
    for sample, pred in zip(samples, from_paths, strict=True):
        cli_codes = read_mask(out / "masks" / sample.name)
        np.testing.assert_array_equal(pred.codes, cli_codes)
        # every input kind gives the same answer: path, PIL image, array
        pil = Image.open(sample.image)
        np.testing.assert_array_equal(seg(pil), pred.ids)
        np.testing.assert_array_equal(seg(np.asarray(pil.convert("RGB"))), pred.ids)
        assert pred.ids.shape == (pil.height, pil.width) and pred.ids.dtype == np.uint8
        # logits at the image's size whose argmax is the mask (to float rounding at ties)
        assert pred.logits.shape == (11, pil.height, pil.width)
        assert (pred.logits.argmax(0) == pred.ids).mean() > 0.999
        colors = np.asarray(pred.color_image().convert("RGB"))
        np.testing.assert_array_equal(colors, pred.colors)
    assert seg.classes == seg.class_map.names and len(seg.classes) == 11


def test_segmenter_repr_says_what_it_is(head):
    seg = Segmenter.from_checkpoint(head, device="cpu")
    names = ", ".join(seg.classes)
    assert repr(seg) == (
        "Segmenter(backbone=dinov2_vits14 (untrained), head=upnext (width 96, depth 2), "
        f"size=56x98, classes=11 ({names}), device=cpu)"
    )
    flipped = Segmenter(seg.model, tta="flip")
    assert repr(flipped).endswith(", device=cpu, tta=flip, sizes 56x98 (2 passes))")


def test_public_surface_is_exported():
    for name in offroad_seg.__all__:
        assert getattr(offroad_seg, name) is not None, name
    with pytest.raises(AttributeError):
        offroad_seg.not_a_thing  # noqa: B018


def test_python_api_example_runs_as_written(tiny_demo, monkeypatch, capsys):
    """docs/python-api.md's example, run after a (tiny) `offroad-seg demo`, as a new user
    would: it asserts itself that its mask is the one the demo's evaluate wrote."""
    code = doc_python("docs/python-api.md", "## Segmenter")
    monkeypatch.chdir(tiny_demo)
    namespace: dict = {}
    exec(compile(code, "docs/python-api.md", "exec"), namespace)
    assert namespace["pred"].ids.shape == (112, 196)
    assert namespace["pred"].logits.shape == (11, 112, 196)
    counts = capsys.readouterr().out.splitlines()[0]  # plain numbers, no np.int64(...)
    assert counts.startswith("{'Background': ") and "np." not in counts
    assert sum(int(v) for v in re.findall(r": (\d+)", counts)) == 112 * 196


def test_readme_python_example_runs_as_written(tiny_demo, monkeypatch, tmp_path):
    """README's ten lines of API, after the same demo: the prediction is the CLI's mask."""
    code = doc_python("README.md", "## Python API")
    demo = tiny_demo / "offroad-seg-demo"
    (tmp_path / "offroad-seg-demo").symlink_to(demo)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    image = namespace["image"]
    written = np.array(Image.open(demo / "predictions" / "masks" / image.name))
    np.testing.assert_array_equal(namespace["pred"].codes, written)
    saved = np.asarray(Image.open(tmp_path / "prediction.png").convert("RGB"))
    np.testing.assert_array_equal(saved, namespace["pred"].colors)
