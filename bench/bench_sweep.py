"""A sweep against the same trainings run as separate `train` commands, side by side.

    python bench/bench_sweep.py [--images 32 | --data DIR] [--trials 4] [--epochs 5] [--head NAME]

Extracts a training and a validation cache once, then trains the same K settings (a grid over
the learning rate) twice: as one `offroad-seg sweep` process, which loads the features once
and trains every trial on them, and as K `offroad-seg train` processes started one after the
other (each paying the interpreter, torch import and cache load). Prints both wall times and
their ratio, and checks that both give the same validation mIoU per setting.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time

from common import base_parser, ensure_cache, machine, setup, table, validation_data


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--val", type=int, default=8)
    p.add_argument("--head", default=None, help="a head from the registry (default: train's)")
    args = p.parse_args()
    data, device = setup(args)
    val_data = validation_data(args)
    train_cache = ensure_cache(data, args.workdir / "sweep-train.zarr", args)
    val_cache = ensure_cache(val_data, args.workdir / "sweep-val.zarr", args)
    lrs = [f"{3e-4 * 2**i:.6g}" for i in range(args.trials)]
    common = ["--val-cache", str(val_cache), "--epochs", str(args.epochs), "--device",
              str(device), "-q"]  # fmt: skip
    if args.head:
        common += ["--head", args.head]
    cli = [sys.executable, "-m", "offroad_seg"]

    out = args.workdir / "bench-sweep"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    cmd = [*cli, "sweep", str(train_cache), str(out), "--grid", "lr=" + ",".join(lrs), *common]
    subprocess.run(cmd, check=True, capture_output=True)
    sweep_s = time.perf_counter() - start
    with open(out / "leaderboard.csv") as f:
        swept = {float(r["lr"]): float(r["val_miou"]) for r in csv.DictReader(f)}

    start = time.perf_counter()
    separate = {}
    for lr in lrs:
        run = args.workdir / f"bench-train-{lr}"
        shutil.rmtree(run, ignore_errors=True)
        cmd = [*cli, "train", str(train_cache), str(run), "--lr", lr, *common]
        subprocess.run(cmd, check=True, capture_output=True)
        best = json.loads((run / "train_stats" / "history.json").read_text())["best"]
        separate[float(lr)] = best["val_miou"]
    separate_s = time.perf_counter() - start

    same = all(abs(swept[lr] - separate[lr]) < 1e-9 for lr in separate)
    setting = f"{args.trials} trials x {args.epochs} epochs, head {args.head or 'default'}"
    print(f"\n{machine(device)}; {setting}, {data}\n")
    rows = [
        (f"{args.trials} x `train` (one process each)", f"{separate_s:.1f}", "1.00"),
        ("one `sweep` (features loaded once)", f"{sweep_s:.1f}", f"{separate_s / sweep_s:.2f}"),
    ]
    print(table(rows, ("how", "wall s", "speed-up")))
    print(f"\nsame val mIoU per setting: {same}")


if __name__ == "__main__":
    main()
