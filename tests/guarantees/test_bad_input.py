"""The bad-input matrix: every case ends with a non-zero exit and one line on stderr that names
the file and the problem, no traceback, and nothing left behind that looks complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from PIL import Image

from offroad_seg.cli import cli
from offroad_seg.data.images import write_mask
from offroad_seg.features.extract import extract
from offroad_seg.training.loop import TrainConfig, train
from tests.conftest import extract_config

H, W = 28, 42  # tiny images; working size 28x42 (2x3 tokens)
SIZE = ["--size", "28x42", "--workers", "0", "--weights", "random"]


def make_dataset(root: Path, n: int = 2) -> Path:
    rng = np.random.default_rng(0)
    (root / "Color_Images").mkdir(parents=True)
    (root / "Segmentation").mkdir(parents=True)
    for i in range(n):
        name = f"cc{i:07d}.png"
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(
            root / "Color_Images" / name
        )
        write_mask(root / "Segmentation" / name, rng.choice([100, 7100, 10000], (H, W)))
    return root


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code != 0, result.output
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def assert_not_complete(cache: Path) -> None:
    if (cache / "zarr.json").exists():
        assert zarr.open_group(str(cache), mode="r").attrs["complete"] is False


# --------------------------------------------------------------------------- datasets


def _missing_seg(d):
    shutil.rmtree(d / "Segmentation")
    return "Segmentation", "no Segmentation/"


def _missing_mask(d):
    (d / "Segmentation" / "cc0000001.png").unlink()
    return "cc0000001.png", "no mask"


def _orphan_mask(d):
    (d / "Color_Images" / "cc0000001.png").unlink()
    return "cc0000001.png", "mask without an image"


def _truncated_png(d):
    p = d / "Color_Images" / "cc0000001.png"
    p.write_bytes(p.read_bytes()[:-60])
    return "cc0000001.png", "not a readable image"


def _not_an_image(d):
    (d / "Color_Images" / "cc0000001.png").write_text("hello")
    return "cc0000001.png", "not a readable image"


def _size_mismatch(d):
    write_mask(d / "Segmentation" / "cc0000001.png", np.full((H, W + 2), 100))
    return "cc0000001.png", "mask is 44x28 but its image is 42x28"


def _rgb_mask(d):
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(d / "Segmentation" / "cc0000001.png")
    return "cc0000001.png", "RGB mask"


def _unknown_codes(d):
    write_mask(d / "Segmentation" / "cc0000001.png", np.full((H, W), 4242))
    return "cc0000001.png", "unknown class codes 4242"


def _empty(d):
    for p in (d / "Color_Images").iterdir():
        p.unlink()
    return "Color_Images", "no PNG images"


def _jpeg_among_pngs(d):
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(d / "Color_Images" / "photo.jpg")
    return "photo.jpg", "unexpected image"


@pytest.mark.parametrize(
    "breakage",
    [
        _missing_seg,
        _missing_mask,
        _orphan_mask,
        _truncated_png,
        _not_an_image,
        _size_mismatch,
        _rgb_mask,
        _unknown_codes,
        _empty,
        _jpeg_among_pngs,
    ],
)
def test_extract_bad_dataset(breakage, tmp_path):
    data = make_dataset(tmp_path / "d")
    culprit, problem = breakage(data)
    result = run("extract", data, tmp_path / "c.zarr", *SIZE)
    assert_one_line_error(result, culprit, problem)
    assert_not_complete(tmp_path / "c.zarr")


def test_stray_system_files_are_ignored(tmp_path):
    data = make_dataset(tmp_path / "d")
    for folder in ("Color_Images", "Segmentation"):
        (data / folder / ".DS_Store").write_bytes(b"\0\0")
        (data / folder / "Thumbs.db").write_bytes(b"\0\0")
    result = run("extract", data, tmp_path / "c.zarr", *SIZE)
    assert result.exit_code == 0, result.output
    assert zarr.open_group(str(tmp_path / "c.zarr"), mode="r")["features"].shape[0] == 2


def test_size_not_multiple_of_14(tmp_path):
    data = make_dataset(tmp_path / "d")
    result = run("extract", data, tmp_path / "c.zarr", "--size", "30x42", "--weights", "random")
    assert_one_line_error(result, "30x42", "multiples of 14")
    assert not (tmp_path / "c.zarr").exists()


def test_weights_not_vits14(tmp_path):
    data = make_dataset(tmp_path / "d")
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "resnet.pth")
    result = run("extract", data, tmp_path / "c.zarr", "--weights", tmp_path / "resnet.pth")
    assert_one_line_error(result, "resnet.pth", "not a DINOv2 or DINOv3 checkpoint")
    assert not (tmp_path / "c.zarr").exists()
    result = run("extract", data, tmp_path / "c.zarr", "--weights", tmp_path / "nope.pth")
    assert_one_line_error(result, "nope.pth", "not found")


# --------------------------------------------------------------------------- train / evaluate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    data = make_dataset(root / "d", n=3)
    extract(extract_config(data, root / "a.zarr", size=(H, W)))
    extract(extract_config(data, root / "l4.zarr", size=(H, W), layers=4))
    train(TrainConfig(caches=(root / "a.zarr",), out=root / "head", epochs=1, progress=False))
    return root


def test_train_on_disagreeing_caches(tiny, tmp_path):
    result = run("train", tiny / "a.zarr", tiny / "l4.zarr", tmp_path / "h")
    assert_one_line_error(result, "l4.zarr: cannot be used with", "differ: layers 4 vs 1")
    assert not (tmp_path / "h" / "segmentation_head.pth").exists()


def test_train_on_unfinished_cache(tiny, tmp_path):
    partial = tmp_path / "p.zarr"
    shutil.copytree(tiny / "a.zarr", partial)
    g = zarr.open_group(str(partial), mode="r+")
    g["done"][1] = False
    g.attrs["complete"] = False
    result = run("train", partial, tmp_path / "h")
    assert_one_line_error(result, "p.zarr", "unfinished (2/3 images)", "rerun")


def test_train_on_corrupt_chunk(tiny, tmp_path):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(tiny / "a.zarr", bad)
    chunk = bad / "features" / "c.0.0.0.0.0"  # the shard holding chunk 0 (format 2)
    data = bytearray(chunk.read_bytes())
    data[40] ^= 0x55
    chunk.write_bytes(bytes(data))
    result = run("train", bad, tmp_path / "h")
    assert_one_line_error(result, "bad.zarr", "features chunk (0, 0, 0, 0, 0)", "cache verify")


def test_train_on_cache_with_missing_chunk(tiny, tmp_path):
    bad = tmp_path / "gone.zarr"
    shutil.copytree(tiny / "a.zarr", bad)
    (bad / "labels" / "c.0.0.0.0").unlink()  # the shard holding chunk 0 (format 2)
    result = run("train", bad, tmp_path / "h")
    assert_one_line_error(result, "gone.zarr", "labels chunk (0, 0, 0, 0): missing")


def test_evaluate_with_head_from_other_weights(tiny, tmp_path):
    from safetensors.torch import save_file

    from offroad_seg.models.backbone import load_backbone

    sd = load_backbone("random").vit.state_dict()
    sd = {k: (v + 0.01 if k == "norm.weight" else v).contiguous() for k, v in sd.items()}
    save_file(sd, tmp_path / "other.safetensors")
    head = tiny / "head" / "segmentation_head.pth"
    result = run(
        "evaluate",
        head,
        tiny / "d",
        tmp_path / "e",
        "--weights",
        tmp_path / "other.safetensors",
        "--workers",
        "0",
    )
    assert_one_line_error(result, "segmentation_head.pth", "trained on other backbone weights")
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_evaluate_with_other_class_map(tiny, tmp_path):
    cmap = tmp_path / "classes.json"
    cmap.write_text(json.dumps([{"code": 1, "name": "thing", "color": [1, 2, 3]}]))
    head = tiny / "head" / "segmentation_head.pth"
    result = run("evaluate", head, tiny / "d", tmp_path / "e", "--class-map", cmap)
    assert_one_line_error(
        result, "segmentation_head.pth", f"another class map than {cmap}", "11 classes vs 1)"
    )


@pytest.mark.parametrize("command", ["evaluate", "predict", "train"])
def test_output_folder_with_results_refused(command, tiny, tmp_path):
    head = tiny / "head" / "segmentation_head.pth"
    out = tmp_path / "out"
    args = {
        "evaluate": ["evaluate", head, tiny / "d", out, "--workers", "0"],
        "predict": ["predict", head, tiny / "d", out, "--workers", "0"],
        "train": ["train", tiny / "a.zarr", out, "--epochs", "1"],
    }[command]
    assert run(*args).exit_code == 0
    # evaluate and predict resume the same command; another run into the folder is refused
    other = ["--tta", "flip"] if command != "train" else []
    again = run(*args, *other)
    needle = "holds the results of another run" if command != "train" else "already holds"
    assert_one_line_error(again, str(out), needle)
    assert run(*args, *other, "--overwrite").exit_code == 0


# --------------------------------------------------------------------------- head arguments


def test_a_run_folder_stands_for_its_head(tiny, tmp_path):
    from offroad_seg.api import Segmenter

    run_folder = tiny / "head"
    result = run("evaluate", run_folder, tiny / "d", tmp_path / "e", "--workers", "0")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["head"] == str(run_folder / "segmentation_head.pth")
    result = run("predict", run_folder, tiny / "d", tmp_path / "p", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "p" / "masks").iterdir())) == 3
    seg = Segmenter.from_checkpoint(run_folder, device="cpu")
    assert seg.model.checkpoint.path == run_folder / "segmentation_head.pth"


@pytest.mark.parametrize(
    "args, needles",
    [  # (arguments after the command, words of the one line)
        (("evaluate", "{d}", "{h}/segmentation_head.pth", "{o}"), ("swapped", "HEAD DATA_DIR")),
        (("evaluate", "{h}", "{h}", "{o}"), ("a head, where a dataset folder",)),
        (("predict", "{d}", "{d}", "{o}"), ("a dataset folder (Color_Images/", "where a head")),
        (("export", "{d}", "{o}.onnx"), ("a dataset folder", "where a head")),
        (("info", "{c}"), ("a feature cache, where a head",)),
        (("compare", "{h}", "{o}"), ("no segmentation_head.pth",)),
    ],
)
def test_a_dataset_for_a_head_or_the_reverse_is_named(args, needles, tiny, tmp_path):
    (tmp_path / "o").mkdir()
    where = {"d": tiny / "d", "h": tiny / "head", "c": tiny / "a.zarr", "o": tmp_path / "o"}
    result = run(*(a.format(**where) for a in args))
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "o" / "metrics.json").exists()


def _html(path: Path) -> None:
    path.write_text("<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n")


def _truncated(path: Path, head: Path) -> None:
    path.write_bytes(head.read_bytes()[:300])


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p, h: _html(p), "an HTML page, not a head checkpoint (a download probably failed"),
        (lambda p, h: _truncated(p, h), "a damaged head checkpoint"),
        (
            lambda p, h: p.write_bytes(b"\x80\x04junk" * 20),
            "not a head checkpoint of plain tensors",
        ),
        (lambda p, h: p.write_bytes(b"GIF89a" * 20), "not a head checkpoint (unrecognised"),
        (lambda p, h: p.write_bytes(b""), "an empty file, not a head checkpoint"),
    ],
)
def test_a_file_that_is_no_checkpoint_is_one_plain_line(make, needle, tiny, tmp_path):
    bad = tmp_path / "h.pth"
    make(bad, tiny / "head" / "segmentation_head.pth")
    result = run("info", bad)
    assert_one_line_error(result, str(bad), needle)
    assert "weights_only" not in result.output and "Warning" not in result.output


def test_an_html_page_for_weights_says_the_download_failed(tmp_path):
    data = make_dataset(tmp_path / "d", n=1)
    _html(tmp_path / "w.pth")
    result = run(
        "extract", data, tmp_path / "c.zarr", "--size", "28x42", "--weights", tmp_path / "w.pth"
    )
    assert_one_line_error(result, "w.pth: an HTML page, not a weights file", "download")
    assert "weights_only" not in result.output


@pytest.mark.parametrize(
    "args, line",
    [
        (("train", "cache/train.zarr"), "Error: missing OUT: train CACHES... OUT"),
        (("sweep", "cache/train.zarr"), "Error: missing OUT: sweep CACHES... OUT"),
        (("predict", "runs/h1", "x.png"), "Error: missing OUT: predict HEAD INPUTS... OUT"),
        (("train",), "Error: missing CACHES... and OUT: train CACHES... OUT"),
    ],
)
def test_a_forgotten_out_is_named(args, line):
    result = run(*args)
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == line
