"""Run records at scale: what evaluate/predict's per-image records and the resume check cost at
N images (issue #26 item 4).

    python bench/bench_run_records.py [--records 100000] [--ranks 1] [--classes 10]
        [--files] [--workdir runs/bench]

Builds the `records/` of an evaluate run of N images through the run folder's own `RecordLog`
(each image: its `writing` line, then its record with a K x K confusion matrix and the
hackathon counts, as evaluate writes them), spread over R rank files. Then times what a rerun
does before it computes anything: `prepare_run_folder` finding the run to resume (with
`--files`: over real, empty output files in the nested layout, whose folders it scans for
dead writers' temporary files), reading the records and finding the pending batches (the
resume check), and what `--overwrite` reads to know the files to remove. Prints seconds and
the records' size.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from common import table

from offroad_seg.data.layout import output_layout
from offroad_seg.inference.batches import pending_batches, plan_image_batches
from offroad_seg.inference.runfolder import (
    RUN_FILE,
    RecordLog,
    RunPlan,
    done_records,
    prepare_run_folder,
    read_records,
    recorded_files,
)

FOLDERS = ("masks", "masks_color", "thumbnails")


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def build(out: Path, n: int, ranks: int, k: int, names: list[str]) -> float:
    """The records of n done images, written as evaluate writes them; returns the seconds."""
    logs = [RecordLog(out, r) for r in range(ranks)]
    start = time.perf_counter()
    for i, name in enumerate(names):
        log = logs[i % ranks]
        files = [f"masks/{name}", f"masks_color/{name}", f"thumbnails/{name[:-4]}.jpg"]
        log.intend(f"img{i:07d}.png", files)
        confusion = [0] * (k * k)
        confusion[(i % k) * (k + 1)] = 100_000 + i
        hackathon = [i % 7] * (2 * k)
        log.append({"key": f"img{i:07d}.png", "i": i, "confusion": confusion,
                    "loss": 0.25, "pixels": 100_000 + i, "hackathon": hackathon})  # fmt: skip
    for log in logs:
        log.close()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--files", action="store_true", help="create the (empty) output files too")
    p.add_argument("--workdir", type=Path, default=Path("runs/bench"))
    args = p.parse_args()
    out = args.workdir / "run-records"
    shutil.rmtree(out, ignore_errors=True)
    n = args.records
    layout = output_layout([Path(f"in/img{i:07d}.png") for i in range(n)])
    plan = RunPlan(
        tuple(f"{f}/{sub}" if sub else f for f in FOLDERS for sub in ("", *layout.folders)),
        ("metrics.json",),
        frozenset(f"{f}/{name}" for f in FOLDERS for name in layout.names),
    )
    identity = {"command": "evaluate", "images": n}
    prepare_run_folder(out, identity, overwrite=False, plan=plan)
    built = build(out, n, args.ranks, args.classes, layout.names)
    if args.files:
        for folder in FOLDERS:
            for name in layout.names:
                (out / folder / name).touch()
    size = sum(f.stat().st_size for f in (out / "records").glob("*.jsonl"))

    rows = [["write the records (RecordLog)", f"{built:.2f}"]]
    _, s = timed(lambda: prepare_run_folder(out, identity, overwrite=False, plan=plan))
    assert _ is True, "the run is found and resumed"
    rows.append(["prepare_run_folder (resume: same run found)", f"{s:.2f}"])

    def resume_check():  # as batches.start_run does it
        done = {i for i in done_records(out).values() if i is not None}
        return pending_batches(plan_image_batches(n, args.batch_size), done)

    todo, s = timed(resume_check)
    assert todo == [], "every image has a record"
    rows.append(["resume check (done_records, pending batches)", f"{s:.2f}"])
    records, s = timed(lambda: read_records(out))
    assert len(records) == n
    rows.append(["every record parsed (evaluate's metrics, once at the end)", f"{s:.2f}"])
    files, s = timed(lambda: recorded_files(out))
    assert len(files) == 3 * n
    rows.append(["--overwrite: the files the records announce", f"{s:.2f}"])
    print(f"{n} records, {args.ranks} rank file(s), {size / 1e6:.1f} MB of records, "
          f"{len(layout.folders)} subfolders per output folder, run file "
          f"{(out / RUN_FILE).stat().st_size / 1e3:.1f} kB")  # fmt: skip
    print(table(rows, ("step", "seconds")))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
