"""bench/gpu_report.py keeps working on a CPU (CI has no GPU): a tiny run writes both files
with every section, and its pieces compute what they say."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def report_module():
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_report

        yield gpu_report
    finally:
        sys.path.remove(str(BENCH))


def test_cpu_run_writes_json_and_markdown(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            str(BENCH / "gpu_report.py"),
            "--device",
            "cpu",
            "--images",
            "4",
            "--scene",
            "196x112",
            "--size",
            "56x98",
            "--epochs",
            "2",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    for key in ("settings", "machine", "parity", "precision", "extraction", "training"):
        assert key in report, key
    for key in ("evaluation", "second_gpu", "syncs", "targets"):
        assert key in report, key
    assert report["settings"]["images"] == 4 and report["machine"]["device"] == "cpu"
    assert report["parity"]["fp32"]["cosine_worst"] == pytest.approx(1.0)
    assert report["parity"]["fp32"]["images"] == 4 and report["parity"]["fp32"]["ok"]
    assert report["extraction"]["images"] == 4 and report["extraction"]["images_per_s"] > 0
    assert report["extraction"]["host_rss_peak_gb"] > 0.1
    assert report["training"]["epochs"] == 2 and report["training"]["source"] == "memory"
    assert report["evaluation"]["metrics_only"]["images"] == 4
    assert report["evaluation"]["writing_masks"]["images_per_s"] > 0
    assert "skipped" in report["second_gpu"] and "skipped" in report["syncs"]
    assert [t["target"] for t in report["targets"]] == [
        "extraction from 960x540 PNGs",
        "20 epochs on 2,857 cached images",
        "evaluation",
    ]
    assert not any(t["comparable"] for t in report["targets"])  # 196x112 scenes, 4 images
    md = (tmp_path / "gpu_report.md").read_text()
    for section in ("## parity", "## extraction", "## training", "## evaluation", "## targets"):
        assert section in md
    assert "| extraction from 960x540 PNGs | >= 1000 images/s |" in md


def test_compare_is_per_image_cosine(report_module):
    a = torch.randn(3, 4, 2, 2)
    b = a.clone()
    b[1] = -a[1]  # one image inverted: cosine -1
    result = report_module.compare(b, a, 0.99)
    assert result["cosine_worst"] == pytest.approx(-1.0) and result["worst_image"] == 1
    assert result["cosine_mean"] == pytest.approx(1 / 3) and not result["ok"]
    assert result["relative_error_max"] == pytest.approx(2.0)
    same = report_module.compare(a, a, 0.99)
    assert same["ok"] and same["relative_error_max"] == 0.0


def test_sync_log_counts_syncs_by_place(report_module):
    log = report_module.SyncLog()
    modes = []

    def every_step() -> None:
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)

    def once() -> None:
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)

    with log.capture(set_mode=modes.append):
        for _ in range(5):
            every_step()
        once()
        with pytest.warns(UserWarning, match="something else"):  # passed on, not counted
            warnings.warn("something else", UserWarning, stacklevel=1)
    assert modes == ["warn", "default"]
    rows = log.rows(steps=5)
    assert [(r["function"], r["count"], r["per_step"]) for r in rows] == [
        ("every_step", 5, True),
        ("once", 1, False),
    ]
    assert rows[0]["where"].endswith(f":{every_step.__code__.co_firstlineno + 1}")
    assert rows[0]["message"] == "called a synchronizing CUDA operation"


def test_targets_scale_training_to_the_target_size(report_module):
    args = type("A", (), {"scene": (960, 540)})()
    report = {
        "extraction": {"images_per_s": 1200.0},
        "training": {"images": 285, "epochs": 2, "seconds": 2.0, "image_epochs_per_s": 285.0},
        "evaluation": {"metrics_only": {"images_per_s": 450.0}},
    }
    rows = report_module.targets(args, report)
    assert [r["met"] for r in rows] == [True, False, False]
    assert rows[1]["comparable"] is False and "scaled: 200.5 s" in rows[1]["measured"]
