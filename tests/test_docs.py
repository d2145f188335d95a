"""The documentation is tested: every python example in README.md and docs/*.md runs, every
relative link resolves, and the install lines CI and users copy stay as they must be.

A python block either needs nothing (it runs here, in an empty folder) or needs state that a
test prepares (a demo run, a cache, an exported model): then RUN_BY names that test, which
reads the block with `doc_python(page, heading)` and runs it. A block that is neither
registered nor runnable on its own fails here.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from offroad_seg.features.cache import FeatureCache
from offroad_seg.features.extract import extract
from tests.conftest import ROOT, DocBlock, doc_blocks, doc_pages, doc_python, extract_config

# (page, heading line, index among that heading's python blocks) -> the test that runs it, as
# "file name::function" (the file is looked for anywhere under tests/)
RUN_BY = {
    ("README.md", "## Python API", 0): (
        "test_api.py::test_readme_python_example_runs_as_written"
    ),
    ("docs/python-api.md", "## Segmenter", 0): (
        "test_api.py::test_python_api_example_runs_as_written"
    ),
    ("docs/deploy.md", "## Running an export with ONNX Runtime alone", 0): (
        "test_export.py::test_docs_onnx_runtime_example_runs_without_the_package"
    ),
    ("docs/data-and-cache.md", "### Reading a cache with plain zarr", 0): (
        "test_docs.py::test_cache_examples_read_what_the_tool_reads"
    ),
    ("docs/data-and-cache.md", "## int8 caches", 0): (
        "test_docs.py::test_cache_examples_read_what_the_tool_reads"
    ),
}  # fmt: skip


def python_blocks() -> list[DocBlock]:
    return [b for page in doc_pages() for b in doc_blocks(page) if b.language == "python"]


def key(block: DocBlock) -> tuple[str, str, int]:
    return (block.page, block.heading, block.index)


STANDALONE = [b for b in python_blocks() if key(b) not in RUN_BY]


# ----------------------------------------------------------------------------- python examples


def test_the_docs_have_python_examples_and_the_registry_names_real_ones():
    found = {key(b) for b in python_blocks()}
    assert len(found) >= 5  # the parser finds the examples this file knows about
    stale = set(RUN_BY) - found
    assert not stale, f"RUN_BY names blocks the docs no longer have: {sorted(stale)}"


def _function_source(path: Path, name: str) -> str:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(path.read_text(), node)
    raise AssertionError(f"{path.name} has no test {name}")


@pytest.mark.parametrize("block", sorted(RUN_BY), ids=lambda k: f"{k[0]}:{k[1]}")
def test_each_registered_block_is_read_by_its_test(block):
    """The named test exists and reads exactly that block (page and heading as literals)."""
    page, heading, index = block
    file, name = RUN_BY[block].split("::")
    found = sorted((ROOT / "tests").rglob(file))
    assert len(found) == 1, f"{RUN_BY[block]}: {len(found)} files named {file} under tests/"
    source = _function_source(found[0], name)
    call = f"doc_python({page!r}, {heading!r}".replace("'", '"')
    assert call in source, f"{RUN_BY[block]} does not run {page} {heading!r}"
    assert index == 0 or f"index={index}" in source
    assert "exec(" in source


@pytest.mark.parametrize(
    "block", STANDALONE, ids=lambda b: f"{b.page}:{b.line}" if isinstance(b, DocBlock) else b
)
def test_every_other_python_block_runs_on_its_own(block, tmp_path, monkeypatch):
    """Blocks that RUN_BY does not list must run in an empty folder: a new example that needs
    a demo, a cache or a model fails here until a test prepares it and RUN_BY names that test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["example"])
    exec(compile(block.code, f"{block.page}:{block.line}", "exec"), {"__name__": "__main__"})


def test_cache_examples_read_what_the_tool_reads(caches, dataset, tmp_path, monkeypatch):
    """docs/data-and-cache.md's plain-zarr readers, on a float16 cache and on a --layers 4 int8
    one: they return the features and labels offroad-seg's own reader returns."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "train.zarr").symlink_to(caches["train"])
    l4 = tmp_path / "cache" / "l4.zarr"
    extract(extract_config(dataset / "train", l4, layers=4, dtype="int8"))
    monkeypatch.chdir(tmp_path)

    plain: dict = {}
    exec(compile(doc_python("docs/data-and-cache.md", "### Reading a cache with plain zarr"),
                 "docs/data-and-cache.md", "exec"), plain)  # fmt: skip
    features, labels = FeatureCache.open(caches["train"]).load()
    assert plain["features"].dtype == np.float16 and plain["features"].shape == (6, 384, 4, 7)
    np.testing.assert_array_equal(plain["features"].astype(np.float32), features[:, 0])
    np.testing.assert_array_equal(plain["labels"], labels[:, 0])

    int8: dict = {}
    exec(compile(doc_python("docs/data-and-cache.md", "## int8 caches"),
                 "docs/data-and-cache.md", "exec"), int8)  # fmt: skip
    expected, _ = FeatureCache.open(l4).load()
    assert int8["v"].dtype == np.int8 and int8["step"].shape[2] == 4
    assert int8["features"].shape == expected.shape == (6, 1, 4 * 384, 4, 7)
    np.testing.assert_allclose(int8["features"], expected, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- links

LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+).*?\1")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text (links as their text, no code or emphasis
    marks) lower-cased, punctuation other than '-' and '_' dropped, spaces as '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def outside_fences(path: Path) -> list[str]:
    """A page's lines outside fenced code blocks."""
    lines, fence = [], None
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence = re.match(r"`+", stripped).group(0)
        elif fence is not None and stripped.startswith(fence) and not stripped.strip("`"):
            fence = None
        elif fence is None:
            lines.append(line)
    return lines


def prose(path: Path) -> list[str]:
    """A page's lines outside fenced code blocks, with inline code removed (links in code
    are examples, not links)."""
    return [INLINE_CODE.sub("", line) for line in outside_fences(path)]


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in outside_fences(path):
        m = re.match(r"^#{1,6} +(.+?)\s*#*\s*$", line)
        if m:
            slug = github_slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links() -> list[tuple[Path, str]]:
    return [
        (page, target)
        for page in doc_pages()
        for line in prose(page)
        for target in LINK.findall(line)
        if not SCHEME.match(target)
    ]


def test_github_slugs_of_headings_we_link_to():
    assert github_slug("`offroad-seg cache info` / `offroad-seg cache verify`") == (
        "offroad-seg-cache-info--offroad-seg-cache-verify"
    )
    assert github_slug("Cache format (version 1)") == "cache-format-version-1"
    assert github_slug("Choosing the default head: the head study") == (
        "choosing-the-default-head-the-head-study"
    )


def test_every_relative_link_resolves():
    links = relative_links()
    assert len(links) >= 50  # the README's command table alone has a dozen
    broken = []
    for page, target in links:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(ROOT)}: ({target})"
        if not file.exists():
            broken.append(f"{where}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{where}: no heading with that anchor in {file.name}")
    assert not broken, "\n".join(broken)


def test_a_broken_link_would_be_found(tmp_path):
    """The checker is not vacuous: it sees links in prose, not in code, and their anchors."""
    page = tmp_path / "p.md"
    page.write_text("# A `b` c\n\n[x](p.md#a-b-c) `[y](q.md)`\n```\n[z](r.md)\n```\n")
    assert LINK.findall(prose(page)[2]) == ["p.md#a-b-c"]
    assert anchors(page) == {"a-b-c"}


# ----------------------------------------------------------------------------- install lines

DEMO_LINE = "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && offroad-seg demo"
TEST_LINE = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && pytest -q'
CI_PATTERN = r'^python3 -m venv \.venv .*pip install -e "\.\[dev\]".*pytest'  # as in .ci/run


def test_readme_keeps_the_quickstart_lines_users_and_ci_run():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert DEMO_LINE in lines
    assert CI_PATTERN in (ROOT / ".ci" / "run").read_text()
    assert next(line for line in lines if re.match(CI_PATTERN, line)) == TEST_LINE


def test_readme_cpu_install_asks_for_the_torch_the_project_accepts():
    """The CPU-wheel line pins torch and torchvision as pyproject does; if it did not, pip
    would replace the CPU wheels with the CUDA build when it installs the project."""
    readme = (ROOT / "README.md").read_text()
    cpu = [line for line in readme.splitlines() if "download.pytorch.org/whl/cpu" in line]
    assert len(cpu) == 1 and cpu[0].startswith("pip install ")
    assert cpu[0].endswith("--index-url https://download.pytorch.org/whl/cpu")
    asked = re.findall(r'"([^"]+)"', cpu[0])
    pyproject = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.S | re.M).group(1)
    declared = re.findall(r'"(torch(?:vision)?[<>=!~][^"]*)"', deps)
    assert sorted(asked) == sorted(declared) and len(asked) == 2
