"""Outputs at scale (issue #26 item 4): evaluate/predict on more images than
`config.OUTPUTS_PER_FOLDER` nest their per-image outputs (by the inputs' subfolders, then in
numbered folders), under names that a rerun, a resume after kill -9 and --overwrite all
agree on; the resume check reads only each record's start. The threshold is made small here
(a monkeypatch in this process, the same assignment in a killed subprocess)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offroad_seg import config
from offroad_seg.data.layout import output_layout
from offroad_seg.errors import DataError
from offroad_seg.inference.runfolder import RECORDS_DIR, RecordLog, done_records, read_records
from tests.guarantees import test_batch_inference as batch
from tests.guarantees.test_scale_out import env

head = batch.head  # the module-scoped head fixture, for this module too
kill_when, run = batch.kill_when, batch.run
N = 8
PER_FOLDER = 3  # N images: folders 0000, 0001 of 3 and 0002 of 2
EVAL = ["--workers", "0", "--device", "cpu", "--comparisons", "0", "--batch-size", "1"]
PER_IMAGE = ("masks", "masks_color", "thumbnails")


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    """N small labelled scenes (a kill lands half way anyway: kill_when freezes the run)."""
    from offroad_seg.data.synthetic import write_split

    root = tmp_path_factory.mktemp("nest-data") / "val"
    write_split(root, N, seed=23, width=196, height=112)
    return root


@pytest.fixture
def small_folders(monkeypatch):
    monkeypatch.setattr(config, "OUTPUTS_PER_FOLDER", PER_FOLDER)


def files_under(out: Path, folder: str) -> dict[str, bytes]:
    return {str(p.relative_to(out / folder)): p.read_bytes()
            for p in sorted((out / folder).rglob("*")) if p.is_file()}  # fmt: skip


def test_outputs_stay_flat_up_to_the_threshold_and_nest_beyond(small_folders):
    flat = [Path(f"in/img{i}.jpg") for i in range(PER_FOLDER)]
    assert output_layout(flat).names == [f"img{i}.png" for i in range(PER_FOLDER)]
    assert output_layout(flat).folders == []
    many = [Path(f"in/img{i:02d}.jpg") for i in range(8)]
    layout = output_layout(many)
    assert layout.names == [f"{i // 3:04d}/img{i:02d}.png" for i in range(8)]
    assert layout.folders == ["0000", "0001", "0002"]
    assert output_layout(list(many)).names == layout.names  # a rerun: the same names
    assert layout.key(4, many[4]) == "0001/img04.jpg"
    # several folders (a dataset's Color_Images/ left out of the name): by folder first, then
    # numbered folders inside a folder of more than the threshold
    drives = [Path(f"drives/a/Color_Images/f{i}.jpg") for i in range(2)]
    drives += [Path(f"drives/b/f{i}.jpg") for i in range(4)]
    layout = output_layout(drives)
    assert layout.names == ["a/f0.png", "a/f1.png",
                            *(f"b/{i // 3:04d}/f{i}.png" for i in range(4))]  # fmt: skip
    assert layout.folders == ["a", "b", "b/0000", "b/0001"]
    assert layout.key(0, drives[0]) == "a/f0.jpg"


def test_same_names_in_two_folders_clash_only_while_outputs_are_flat(
    small_folders, monkeypatch, head, split, tmp_path
):
    from offroad_seg.data.inputs import list_inputs

    images = sorted((split / "Color_Images").iterdir())
    for drive in "ab":  # the same 2 images in each
        (tmp_path / "drives" / drive).mkdir(parents=True)
        for image in images[:2]:
            shutil.copy(image, tmp_path / "drives" / drive / image.name)
    with monkeypatch.context() as mp:  # 4 images, flat up to 4: one masks/x.png for two
        mp.setattr(config, "OUTPUTS_PER_FOLDER", 4)
        with pytest.raises(DataError, match="same file name"):
            list_inputs([tmp_path / "drives" / "*"])
    out = tmp_path / "pred"  # flat up to 3: nested by drive
    r = run("predict", head, tmp_path / "drives" / "*", out, *EVAL[:4], "--no-overlays")
    assert r.exit_code == 0, r.output
    for folder in ("masks", "masks_color"):
        expected = {f"{d}/{p.stem}.png" for d in "ab" for p in images[:2]}
        assert set(files_under(out, folder)) == expected
    for name in (p.stem for p in images[:2]):  # the same image in both drives: the same mask
        assert (out / "masks" / "a" / f"{name}.png").read_bytes() == (
            out / "masks" / "b" / f"{name}.png"
        ).read_bytes()
    assert sorted(done_records(out)) == sorted(f"{d}/{p.name}" for d in "ab" for p in images[:2])


@pytest.fixture(scope="module")
def nested_eval(head, split, tmp_path_factory) -> Path:
    """An uninterrupted evaluation with outputs nested in folders of PER_FOLDER."""
    out = tmp_path_factory.mktemp("nested") / "reference"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config, "OUTPUTS_PER_FOLDER", PER_FOLDER)
        r = run("evaluate", head, split, out, *EVAL)
    assert r.exit_code == 0, r.output
    return out


def test_a_nested_evaluate_killed_half_way_resumes_writing_nothing_twice(
    small_folders, head, split, nested_eval, tmp_path
):
    names = sorted(p.stem for p in (split / "Color_Images").iterdir())
    expected = {f"{i // PER_FOLDER:04d}/{n}.png" for i, n in enumerate(names)}
    assert set(files_under(nested_eval, "masks")) == expected
    out = tmp_path / "killed"
    patched = f"from offroad_seg import config; config.OUTPUTS_PER_FOLDER = {PER_FOLDER}; " \
        "from offroad_seg.cli import main; main()"  # fmt: skip
    cmd = [sys.executable, "-c", patched, "evaluate", head, split, out, *EVAL]
    threads = {**env(), "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same sums
    proc = subprocess.Popen([str(c) for c in cmd], env=threads, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    stopped = kill_when(proc, out, at_least=3)
    assert 0 < stopped < N, f"not stopped half way ({stopped} of {N})"
    done_before = {k: i for k, i in done_records(out).items()}
    written = {p: p.stat().st_mtime_ns for f in PER_IMAGE for p in (out / f).rglob("*.*")}
    r = run("evaluate", head, split, out, *EVAL)
    assert r.exit_code == 0, r.output
    # every image's record once (batches of 1: nothing recomputed), the same files and metrics
    lines = [json.loads(line) for p in (out / RECORDS_DIR).glob("*.jsonl")
             for line in p.read_text().splitlines()]  # fmt: skip
    keys = [e["key"] for e in lines if "writing" not in e]
    assert sorted(keys) == sorted(f"{n}.png" for n in names)
    for key, index in done_before.items():
        assert done_records(out)[key] == index
    for path, mtime in written.items():  # the images done before the kill: not rewritten
        if any(path.stem == Path(k).stem for k in done_before):
            assert path.stat().st_mtime_ns == mtime, path
    for folder in PER_IMAGE:
        assert files_under(out, folder) == files_under(nested_eval, folder), folder
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (out, nested_eval))
    assert a.pop("seconds") >= 0 and b.pop("seconds") >= 0
    assert a == b


def test_overwrite_of_a_nested_run_removes_only_what_it_recorded(
    small_folders, head, split, nested_eval, tmp_path
):
    out = tmp_path / "mixed"
    shutil.copytree(nested_eval, out)
    (out / "thumbnails" / "0001" / "mine.txt").write_text("keep me")
    (out / "masks" / "0002" / "notes").mkdir()
    r = run("predict", head, split / "Color_Images", out, *EVAL[:4], "--no-overlays",
            "--overwrite")  # fmt: skip
    assert r.exit_code == 0, r.output
    # evaluate's thumbnails went, the folder holding the user's file stayed, with the file
    assert sorted(str(p.relative_to(out)) for p in (out / "thumbnails").rglob("*")) == [
        "thumbnails/0001",
        "thumbnails/0001/mine.txt",
    ]
    assert (out / "masks" / "0002" / "notes").is_dir()
    names = sorted(p.stem for p in (split / "Color_Images").iterdir())
    expected = {f"{i // PER_FOLDER:04d}/{n}.png" for i, n in enumerate(names)}
    assert set(files_under(out, "masks")) == expected  # predict's masks, nested alike
    assert not (out / "metrics.json").exists() and (out / "predictions.json").is_file()


def test_the_resume_check_reads_what_read_records_reads(tmp_path):
    """done_records, reading only each line's start, finds the records read_records parses
    whole: escaped keys, a video's record, a record written in another key order, an image
    redone, and a torn last line, which the next writer cuts off."""
    log = RecordLog(tmp_path, 0)
    log.intend("a.png", ["masks/a.png"])
    log.append({"key": "a.png", "i": 0, "confusion": [1, 2]})
    log.intend('q"uote\\ü.png', ["masks/q.png"])
    log.append({"key": 'q"uote\\ü.png', "i": 1})
    log.append({"key": "video:drive.mp4", "frames": 5})
    log.append({"i": 2, "key": "b.png"})
    log.append({"key": "a.png", "i": 0, "confusion": [3, 4]})
    log.close()
    path = tmp_path / RECORDS_DIR / "rank-0.jsonl"
    with open(path, "a") as f:
        f.write('{"key":"c.png","i":3,"conf')  # killed mid-line
    expected = {k: r.get("i") for k, r in read_records(tmp_path).items()}
    assert expected == {"a.png": 0, 'q"uote\\ü.png': 1, "video:drive.mp4": None, "b.png": 2}
    assert done_records(tmp_path) == expected
    RecordLog(tmp_path, 0).close()  # the next writer of this rank
    assert path.read_text().endswith('"confusion":[3,4]}\n')
    assert done_records(tmp_path) == expected


def test_an_older_versions_torn_line_ended_by_a_newline_is_not_a_record(tmp_path):
    (tmp_path / RECORDS_DIR).mkdir()
    (tmp_path / RECORDS_DIR / "rank-0.jsonl").write_text(
        '{"key":"a.png","i":0}\n{"key":"b.png","i":1,"confusion":[1,\n'
    )
    assert (
        done_records(tmp_path)
        == {"a.png": 0}
        == {k: r.get("i") for k, r in read_records(tmp_path).items()}
    )
