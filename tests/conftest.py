"""Shared fixtures: tiny synthetic datasets, a random backbone and caches built once per session.

Small images (196x112 scenes, a 56x98 working size = 4x7 tokens) keep the whole suite fast on
two CPU cores while exercising every code path the real 960x540 -> 266x476 data takes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from offroad_seg.data.synthetic import write_split
from offroad_seg.features.extract import ExtractConfig, extract
from offroad_seg.models.backbone import Backbone, load_backbone

SCENE_W, SCENE_H = 196, 112
SIZE = (56, 98)  # working size: rows x cols, 4x7 tokens

torch.set_num_threads(2)

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python(heading: str) -> str:
    """The first ```python block after README's `heading` (tests run README's examples)."""
    text = README.read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(heading) :], re.S).group(1)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """train (6 images) and val (3 images) splits in the real dataset format."""
    root = tmp_path_factory.mktemp("data")
    write_split(root / "train", 6, seed=1, width=SCENE_W, height=SCENE_H)
    write_split(root / "val", 3, seed=2, width=SCENE_W, height=SCENE_H)
    return root


@pytest.fixture(scope="session")
def backbone() -> Backbone:
    return load_backbone("random")


def extract_config(data_dir: Path, cache: Path, **kw) -> ExtractConfig:
    defaults = dict(weights="random", size=SIZE, batch_size=4, workers=0, progress=False)
    return ExtractConfig(data_dir=data_dir, cache=cache, **{**defaults, **kw})


@pytest.fixture(scope="session")
def caches(dataset, tmp_path_factory) -> dict[str, Path]:
    """Finished caches of the session dataset: train with a flip view, val without."""
    root = tmp_path_factory.mktemp("caches")
    out = {"train": root / "train.zarr", "val": root / "val.zarr"}
    extract(extract_config(dataset / "train", out["train"], views=("identity", "hflip")))
    extract(extract_config(dataset / "val", out["val"]))
    return out


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A folder in which a tiny `offroad-seg demo` ran (README's examples start from one):
    the demo's outputs are in `offroad-seg-demo/` inside it."""
    import os

    from click.testing import CliRunner

    from offroad_seg.cli import cli

    root = tmp_path_factory.mktemp("demo")
    tiny = "--train 4 --val 2 --epochs 2 --width 196 --height 112 --size 56x98"
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = CliRunner().invoke(cli, ["demo", *tiny.split()])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return root
