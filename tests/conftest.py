"""Shared fixtures: tiny synthetic datasets, a random backbone and caches built once per session.

Small images (196x112 scenes, a 56x98 working size = 4x7 tokens) keep the whole suite fast on
two CPU cores while exercising every code path the real 960x540 -> 266x476 data takes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from offroad_seg.data.synthetic import write_split
from offroad_seg.features.extract import ExtractConfig, extract
from offroad_seg.models.backbone import Backbone, load_backbone

SCENE_W, SCENE_H = 196, 112
SIZE = (56, 98)  # working size: rows x cols, 4x7 tokens

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)")
HEADING = re.compile(r"^(#{1,6}) +(.+?)\s*#*\s*$")


@dataclass(frozen=True)
class DocBlock:
    """A fenced code block of a documentation page, named by the heading above it."""

    page: str  # relative to the repository root: "README.md", "docs/deploy.md"
    heading: str  # the nearest heading line above it, as written: "## Python API"
    index: int  # its place among the blocks of its language under that heading
    language: str  # the fence's info string: "python", "bash", "" ...
    line: int  # where its code starts (1-based)
    code: str


def doc_pages() -> list[Path]:
    """README.md and every docs/*.md: the pages whose examples and links are tested."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def doc_blocks(path: Path) -> list[DocBlock]:
    """Every fenced block of a page, in order (headings inside blocks are code, not headings)."""
    page, heading, counts = path.relative_to(ROOT).as_posix(), "", {}
    blocks, fence, start, language = [], None, 0, ""
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if fence is None:
            opened = FENCE.match(line)
            if opened:
                fence, start, language = opened.group(1), number, opened.group(2)
            elif HEADING.match(line):
                heading = line.rstrip()
            continue
        closing = line.strip()
        if closing.startswith(fence) and not closing.strip("`"):
            index = counts.get((heading, language), 0)
            counts[(heading, language)] = index + 1
            code = "\n".join(lines[start : number - 1]) + "\n"
            blocks.append(DocBlock(page, heading, index, language, start + 1, code))
            fence = None
    assert fence is None, f"{page}:{start}: a code block is never closed"
    return blocks


def doc_python(page: str, heading: str, index: int = 0) -> str:
    """The code of a ```python block of a page (`README.md`, `docs/deploy.md`), the `index`-th
    under its `heading` line as written (`## Deploy`): tests run the docs' examples. The
    tests that do are listed in tests/test_docs.py's RUN_BY."""
    for block in doc_blocks(ROOT / page):
        if (block.language, block.heading, block.index) == ("python", heading, index):
            return block.code
    raise LookupError(f"{page}: no python block {index} under {heading!r}")


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
    (root / "demo-output.txt").write_text(result.stdout)  # what the user saw
    (root / "demo-log.txt").write_text(result.stderr)
    return root


@contextmanager
def interrupted_in_epoch(epoch: int) -> Iterator[None]:
    """Inside the block, training is interrupted (KeyboardInterrupt, as Ctrl-C) in epoch
    `epoch`, after it was computed and before it was saved: last.pth holds epoch - 1."""
    import offroad_seg.training.loop as loop

    real_line = loop._epoch_line

    def crash(row, epochs):
        if row["epoch"] == epoch:
            raise KeyboardInterrupt
        return real_line(row, epochs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "_epoch_line", crash)
        yield
