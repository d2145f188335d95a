"""Head study: heads at a few widths on two feature proxies, mIoU against training cost.

    python bench/head_study.py [--train 16 --val 8] [--epochs 16] [--seeds 0,1,2]
        [--grid "linear=0;seed=128;convnext=96,192;upnext=64,96,192;pyramid=32,96"] [--batch 2]
        [--difficulty 0.5] [--jobs 2] [--plot docs/head-frontier.png]
        [--data TRAIN --val-data VAL] [--weights random]

Two proxies for DINOv2 features, the same scenes and labels:
  semantic   tokens synthesised from the label maps the way a frozen, trained ViT behaves
             (bench/semantic_proxy.py: per-class prototypes mixed by area over each patch,
             within-class variation, nuisances, noise; `--difficulty`)
  untrained  the backbone of `--weights` (untrained by default) on the synthetic scenes:
             features of colour and texture, no semantics, which favours heavy heads
Each (head, width) of `--grid` ("WIDTH" or "WIDTHxDEPTH"; 0 for heads without a width) is
trained with each seed for `--epochs` epochs at batch `--batch` on each proxy's training cache
(`--jobs` trainings at a time, one thread each) and scored by its best epoch's validation
mIoU. Then every setting's training cost is measured side by side in one process (the
training threads of this machine): seconds per image of a training step (forward, loss at the
label size, backward, AdamW) at batch `--batch` on a 19x34 grid of 384 channels, the settings
in turns, best of 5 rounds; it is the cached epoch's cost per image (bench/bench_train.py
finds the cache's overhead on top 1.01-1.04x). GFLOP: `flops_per_image`, forward, at 19x34.

Prints the frontier table (markdown) and writes the frontier plot (`--plot`).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from common import (
    base_parser,
    ensure_cache,
    machine,
    mean_sd,
    setup,
    spawn_map,
    spread,
    validation_data,
)
from semantic_proxy import write_semantic_cache

from offroad_seg.config import TrainConfig
from offroad_seg.models.heads import HeadConfig, build_head, count_parameters, flops_per_image
from offroad_seg.training.loop import make_optimizer, train
from offroad_seg.training.losses import segmentation_loss

PROXIES = ("semantic", "untrained")
GRID = (19, 34)  # the default working size's token grid
SIZE = (266, 476)
DEFAULT_GRID = "linear=0;seed=128;convnext=96,192;upnext=64,96,192;pyramid=32,96"


@dataclass(frozen=True)
class Setting:
    head: str
    width: int
    depth: int = 0

    @property
    def label(self) -> str:
        if self.head == "linear":
            return "linear"
        return f"{self.head} w{self.width}" + (f" d{self.depth}" if self.depth else "")

    def config(self, channels: int = 384) -> HeadConfig:
        return HeadConfig(name=self.head, in_channels=channels, width=self.width, depth=self.depth)


def parse_grid(text: str) -> list[Setting]:
    """'linear=0;upnext=96,96x1' -> [linear, upnext w96, upnext w96 d1]"""
    out = []
    for part in text.split(";"):
        head, widths = part.split("=")
        for w in widths.split(","):
            width, _, depth = w.partition("x")
            out.append(Setting(head.strip(), int(width), int(depth or 0)))
    return out


def _train_one(task: tuple) -> float:
    """One training in a worker process (one thread): its best validation mIoU."""

    torch.set_num_threads(1)
    logging.getLogger("offroad_seg").setLevel(logging.WARNING)
    cfg, setting = task
    cfg = replace(cfg, head=setting.head, width=setting.width, depth=setting.depth)
    return train(cfg).best["val_miou"]


def train_all(caches: dict, settings, seeds, args) -> dict:
    """{(proxy, setting): [mIoU per seed]}"""
    tasks, keys = [], []
    for proxy, (train_cache, val_cache) in caches.items():
        for s in settings:
            for seed in seeds:
                out = args.workdir / "study-runs" / f"{proxy}-{s.label.replace(' ', '-')}-{seed}"
                cfg = TrainConfig(
                    caches=(train_cache,), out=out, val_cache=val_cache, epochs=args.epochs,
                    batch_size=args.batch, seed=seed, device="cpu", progress=False,
                    overwrite=True,
                )  # fmt: skip
                tasks.append((cfg, s))
                keys.append((proxy, s))
    # the costliest first, so that the jobs finish together
    order = sorted(range(len(tasks)), key=lambda i: -flops_per_image(keys[i][1].config(), GRID))
    tasks, keys = [tasks[i] for i in order], [keys[i] for i in order]
    scores: dict = {}
    for (proxy, s), score in zip(keys, spawn_map(_train_one, tasks, args.jobs), strict=True):
        scores.setdefault((proxy, s), []).append(score)
        if len(scores[(proxy, s)]) == len(seeds):
            runs = " ".join(f"{v:.4f}" for v in scores[(proxy, s)])
            print(f"{proxy:9} {s.label:18} {runs}", flush=True)
    return scores


def step_seconds(settings, batch: int, rounds: int = 5, steps: int = 3) -> dict:
    """Seconds per image of a training step of each setting, in turns, best of `rounds`."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 384, *GRID, generator=g)
    y = torch.randint(0, 11, (batch, *SIZE), generator=g)
    weight = torch.rand(11, generator=g) + 0.5
    models = {}
    for s in settings:
        torch.manual_seed(0)
        head = build_head(s.config())
        models[s] = (head, make_optimizer(head, 3e-4, 0.01))
    best = dict.fromkeys(settings, float("inf"))
    for _ in range(rounds):
        for s, (head, opt) in models.items():
            t = time.perf_counter()
            for _ in range(steps):
                loss = segmentation_loss(head(x), y, weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            best[s] = min(best[s], (time.perf_counter() - t) / (steps * batch))
    return best


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Whether each (cost, quality) point is on the frontier: no other point is cheaper (or
    as cheap) and better."""
    return [
        not any((c2 <= c and q2 > q) or (c2 < c and q2 >= q) for c2, q2 in points)
        for c, q in points
    ]


def plot(path: Path, settings, cost, scores, reference: Setting | None, proxies) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(proxies), figsize=(5 * len(proxies), 3.9), squeeze=False)
    colours = {}
    for ax, proxy in zip(axes[0], proxies, strict=True):
        pts = [(cost[s] * 1e3, statistics.mean(scores[(proxy, s)])) for s in settings]
        on = pareto(pts)
        for s, (c, q), front in zip(settings, pts, on, strict=True):
            colour = colours.setdefault(s.head, f"C{len(colours)}")
            sd = spread(scores[(proxy, s)])
            ax.errorbar(c, q, yerr=sd, fmt="o" if front else "x", color=colour, capsize=2)
            ax.annotate(s.label, (c, q), textcoords="offset points", xytext=(4, 3), fontsize=7)
        front = sorted(p for p, f in zip(pts, on, strict=True) if f)
        ax.plot(*zip(*front, strict=True), "--", color="grey", lw=0.8)
        if reference is not None:
            ax.axvline(cost[reference] * 1e3 / 4, color="grey", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_title(f"{proxy} proxy")
        ax.set_xlabel("training ms per image (cached epoch, this CPU)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("val mIoU (mean ± std, 3 seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    print(f"wrote {path}")


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--train", type=int, default=16, help="synthetic training images")
    p.add_argument("--val", type=int, default=8, help="synthetic validation images")
    p.add_argument("--val-data", help="a validation dataset folder (with --data)")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--grid", default=DEFAULT_GRID)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--difficulty", type=float, default=0.5, help="of the semantic proxy")
    p.add_argument("--jobs", type=int, default=2, help="trainings at a time (one thread each)")
    p.add_argument("--plot", type=Path, help="write the frontier plot (PNG) here")
    p.add_argument("--proxies", default=",".join(PROXIES), help="semantic, untrained or both")
    p.add_argument("--threads", type=int, help="threads of the timing pass (default: torch's)")
    p.add_argument(
        "--reuse-scores", action="store_true",
        help="take the mIoUs of an earlier run (WORKDIR/head-study-scores.json) and only time",
    )  # fmt: skip
    args = p.parse_args()
    args.images = args.train
    data, _ = setup(args)
    val_data = validation_data(args)
    logging.getLogger("offroad_seg").setLevel(logging.WARNING)
    wd = args.workdir
    train_u = ensure_cache(data, wd / f"study-{data.name}-train.zarr", args,
                           views=("identity", "hflip"))  # fmt: skip
    val_u = ensure_cache(val_data, wd / f"study-{val_data.name}-val.zarr", args)
    d = args.difficulty
    semantic = []
    for source in (train_u, val_u):
        dest = source.with_name(source.name.replace(".zarr", f"-semantic{d:g}.zarr"))
        if not (dest / "zarr.json").exists():
            write_semantic_cache(source, dest, d)
        semantic.append(dest)
    proxies = args.proxies.split(",")
    caches = {"semantic": tuple(semantic), "untrained": (train_u, val_u)}
    caches = {p: caches[p] for p in proxies}
    settings = parse_grid(args.grid)
    seeds = [int(s) for s in args.seeds.split(",")]

    started = time.perf_counter()
    saved = wd / "head-study-scores.json"
    if args.reuse_scores:
        stored = json.loads(saved.read_text())
        scores = {(p, s): stored[p][s.label] for p in proxies for s in settings}
    else:
        scores = train_all(caches, settings, seeds, args)
        stored = {p: {s.label: scores[(p, s)] for s in settings} for p in proxies}
        saved.write_text(json.dumps(stored, indent=1))
    train_minutes = (time.perf_counter() - started) / 60
    if args.threads:
        torch.set_num_threads(args.threads)
    cost = step_seconds(settings, args.batch)
    gflop = {s: flops_per_image(s.config(), GRID) / 1e9 for s in settings}
    params = {s: count_parameters(build_head(s.config())) for s in settings}
    reference = next((s for s in settings if (s.head, s.width) == ("pyramid", 96)), None)

    fronts = {}
    for proxy in proxies:
        pts = [(cost[s], statistics.mean(scores[(proxy, s)])) for s in settings]
        fronts[proxy] = dict(zip(settings, pareto(pts), strict=True))

    def cell(proxy: str, s: Setting) -> str:
        text = mean_sd(scores[(proxy, s)])
        return f"**{text}**" if fronts[proxy][s] else text

    header = ["setting", "params", "GFLOP/image", "train ms/image", "vs pyramid w96"]
    header += [f"{p} mIoU" for p in proxies]
    print(
        f"\n{machine(torch.device('cpu'))}; train {data} ({args.train} x 2 views), val "
        f"{val_data}; {args.epochs} epochs, batch {args.batch}, seeds {args.seeds}; semantic "
        f"difficulty {d:g}; "
        + (
            "mIoUs of an earlier run"
            if args.reuse_scores
            else f"trainings {train_minutes:.1f} min with {args.jobs} jobs"
        )
        + "\n"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for s in sorted(settings, key=lambda s: cost[s]):
        ratio = f"{cost[s] / cost[reference]:.2f}" if reference else "-"
        row = [
            s.label,
            f"{params[s] / 1e3:.0f} k",
            f"{gflop[s]:.2f}",
            f"{cost[s] * 1e3:.1f}",
            ratio,
        ]
        print("| " + " | ".join(row + [cell(p, s) for p in proxies]) + " |")
    print("\n(bold: on the mIoU/cost frontier of that proxy)")
    if args.plot:
        plot(args.plot, settings, cost, scores, reference, proxies)


if __name__ == "__main__":
    main()
