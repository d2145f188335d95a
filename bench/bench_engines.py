"""Inference engines: torch eager against ONNX Runtime float32 and int8, on the same images.

    python bench/bench_engines.py [--images 32 | --data DIR] [--batch-size 8] [--repeat 3]
        [--threads N] [--study]

  torch eager        SegmentationModel.logits on resized uint8 images already in memory
  onnxruntime fp32   the exported graph (`export_model`, dynamic batch) through OnnxEngine.logits
  onnxruntime int8   the same graph after `quantize_dynamic_int8` (export --quantize dynamic)
  evaluate (x2)      `evaluate --no-masks --comparisons 0` end to end with each fp32 engine

Every engine sees the same images in the same batches, taking turns batch by batch; each
batch's best time over --repeat counts (evaluate: the best whole run).
CPU s/image (all threads' CPU time, best per batch) does not count time spent waiting for a
core that another process holds: on a shared machine it compares the engines' work when their
wall times cannot. Also printed: export and quantisation times, model sizes, and each engine's
largest logit difference from torch (relative to the logit range) and mask agreement with torch
at the working size. --study adds ONNX Runtime settings (optimisation level, threads, spinning) and
the float32 GEMM rate of both libraries, which explain the float32 ratio.

`--weights random` (the default) uses a random backbone whose blocks matter (layer scales
U(0.1, 1), 4x qkv weights; timm's random DINOv2 has layer scales of 1e-5, so its blocks are
nearly the identity and int8 errors inside them would be hidden), and a head trained briefly on
its features, so that the int8 agreement is not flattered. Speed does not depend on the values.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import base_parser, ensure_cache, machine, setup, table
from safetensors.torch import save_file

from offroad_seg.data.dataset import list_samples
from offroad_seg.data.images import read_image
from offroad_seg.inference.engines import OnnxEngine
from offroad_seg.inference.evaluate import EvalConfig, evaluate
from offroad_seg.inference.export import export_model, quantize_dynamic_int8
from offroad_seg.models.backbone import create_vit
from offroad_seg.models.preprocess import image_to_tensor, parse_size, resize_image
from offroad_seg.models.segmentation import SegmentationModel
from offroad_seg.models.variants import get_variant
from offroad_seg.training.loop import TrainConfig, train


def active_random_weights(path: Path, name: str = "dinov2_vits14", seed: int = 0) -> str:
    """A random backbone whose blocks change the features as trained ones do (see above)."""
    if not path.exists():
        with torch.device("meta"):
            vit = create_vit(get_variant(name))
        vit.to_empty(device="cpu")
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, param in vit.named_parameters():
                if key.endswith("gamma"):
                    param.uniform_(0.1, 1.0, generator=gen)
                elif "norm" in key:
                    param.fill_(1.0 if key.endswith("weight") else 0.0)
                else:
                    param.normal_(0.0, 0.02, generator=gen)
            for block in vit.blocks:
                block.attn.qkv.weight.mul_(4)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
    return str(path)


def working_size_masks(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1)


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_rate(threads: int) -> tuple[float, float]:
    """GFLOP/s of the ViT-S MLP's float32 GEMM (batch 8 at 266x476: 5176 x 384 @ 384 x 1536)
    in torch and in ONNX Runtime."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    m, k, n = 5176, 384, 1536
    x = np.random.default_rng(0).standard_normal((m, k), dtype=np.float32)
    w = np.random.default_rng(1).standard_normal((k, n), dtype=np.float32)
    flops = 2 * m * k * n
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    torch_s = best_time(lambda: xt @ wt, 5)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options)
    session.run(None, {"x": x})
    ort_s = best_time(lambda: session.run(None, {"x": x}), 5)
    return flops / torch_s / 1e9, flops / ort_s / 1e9


def study_session(path: Path, level: str, threads: int, spinning: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3, help="best of N for each path")
    p.add_argument("--epochs", type=int, default=3, help="head training on the cache")
    p.add_argument("--study", action="store_true", help="ONNX Runtime settings and GEMM rates")
    p.add_argument("--threads", type=int, default=None, help="both engines [default: torch's]")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.weights == "random":
        args.weights = active_random_weights(args.workdir / "active-random-vits14.safetensors")
    data, _ = setup(args)
    device = torch.device("cpu")  # this compares CPU engines
    threads = torch.get_num_threads()
    cache = ensure_cache(data, args.workdir / f"{data.name}-{args.size}-active.zarr", args)
    run = args.workdir / "engines-head"
    head_path = run / "segmentation_head.pth"
    if not head_path.exists():
        shutil.rmtree(run, ignore_errors=True)
        train(TrainConfig(caches=(cache,), out=run, epochs=args.epochs, progress=False))

    model = SegmentationModel.from_checkpoint(head_path, args.weights, device)
    prep = model.preprocessing
    assert prep.size == parse_size(args.size)
    samples = list_samples(data)
    images = torch.cat([resize_image(image_to_tensor(read_image(s.image)), prep) for s in samples])
    n, bs = len(images), args.batch_size
    batches = [images[s : s + bs] for s in range(0, n, bs)]

    scratch = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    try:
        start = time.perf_counter()
        fp32 = export_model(model, scratch / "fp32.onnx", batch=None)
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        quantize_dynamic_int8(scratch / "fp32.onnx", scratch / "int8.onnx")
        quantize_s = time.perf_counter() - start
        int8_bytes = (scratch / "int8.onnx").stat().st_size
        engines = {
            "torch eager": model,
            "onnxruntime fp32": OnnxEngine(scratch / "fp32.onnx", threads=threads),
            "onnxruntime int8": OnnxEngine(scratch / "int8.onnx", threads=threads),
        }
        outputs = {name: torch.cat([e.logits(b) for b in batches]) for name, e in engines.items()}

        def eval_pass(head: Path) -> float:
            out = scratch / "eval"
            shutil.rmtree(out, ignore_errors=True)
            cfg = EvalConfig(
                head=head,
                data_dir=data,
                out=out,
                batch_size=bs,
                device="cpu",
                comparisons=0,
                write_masks=False,
                progress=False,
            )
            return evaluate(cfg).seconds

        evals = {"evaluate, torch": head_path, "evaluate, onnxruntime fp32": scratch / "fp32.onnx"}
        # engines take turns batch by batch, and each batch counts its best time over the
        # repeats: on a shared machine, load that comes and goes then hits every engine alike
        per_batch = {name: [float("inf")] * len(batches) for name in engines}
        cpu = {name: [float("inf")] * len(batches) for name in engines}  # CPU seconds, all threads
        best = {name: float("inf") for name in evals}
        for _ in range(args.repeat):
            for i, b in enumerate(batches):
                for name, engine in engines.items():
                    c = time.process_time()
                    t = best_time(lambda e=engine, b=b: e.logits(b), 1)
                    per_batch[name][i] = min(per_batch[name][i], t)
                    cpu[name][i] = min(cpu[name][i], time.process_time() - c)
            for name, head in evals.items():
                best[name] = min(best[name], eval_pass(head))
        best = {**{name: sum(times) for name, times in per_batch.items()}, **best}

        ref = outputs["torch eager"]
        scale = max(1.0, ref.abs().max().item())
        ref_mask = working_size_masks(ref, prep.size)
        rows = []
        for name in best:
            ips = n / best[name]
            ratio = best["torch eager"] / best[name]
            if name in outputs:
                out = outputs[name]
                diff = f"{(out - ref).abs().max().item() / scale:.1e}"
                mask = working_size_masks(out, prep.size)
                agree = f"{(mask == ref_mask).float().mean().item():.5f}"
                cpu_s = f"{sum(cpu[name]) / n:.3f}"
            else:
                diff = agree = cpu_s = ""
            rows.append((name, f"{ips:.2f}", f"{ratio:.2f}", cpu_s, diff, agree))
        print(f"engines, {n} images at {prep.size[0]}x{prep.size[1]}, batch {bs}, CPU")
        print(f"machine: {machine(device)}")
        header = ("path", "images/s", "vs torch", "CPU s/image", "max logit diff", "mask agreement")
        print(table(rows, header))
        print(
            f"export {export_s:.1f} s ({fp32.bytes / 1e6:.1f} MB), int8 quantisation "
            f"{quantize_s:.1f} s ({int8_bytes / 1e6:.1f} MB)"
        )
        ort_ratio = best["torch eager"] / best["onnxruntime fp32"]
        int8_ratio = best["torch eager"] / best["onnxruntime int8"]
        print(f"onnxruntime / torch throughput: fp32 {ort_ratio:.2f}, int8 {int8_ratio:.2f}")

        if args.study:
            x = images[:bs].numpy()
            rows = []
            settings = [
                ("ORT_ENABLE_ALL", threads, True),
                ("ORT_ENABLE_EXTENDED", threads, True),
                ("ORT_ENABLE_BASIC", threads, True),
                ("ORT_DISABLE_ALL", threads, True),
                ("ORT_ENABLE_ALL", threads, False),
                ("ORT_ENABLE_ALL", 1, True),
            ]
            for level, t, spin in settings:
                session = study_session(scratch / "fp32.onnx", level, t, spin)
                session.run(["head_logits"], {"images": x})
                s = best_time(lambda s=session: s.run(["head_logits"], {"images": x}), args.repeat)
                spinning = "on" if spin else "off"
                rows.append((f"fp32, {level}, {t} threads, spinning {spinning}", f"{bs / s:.2f}"))
            torch.set_num_threads(1)
            s = best_time(lambda: model.logits(images[:bs]), args.repeat)
            torch.set_num_threads(threads)
            rows.append(("torch eager, 1 thread", f"{bs / s:.2f}"))
            print(table(rows, ("onnxruntime setting (one batch)", "images/s")))
            torch_rate, ort_rate = gemm_rate(threads)
            print(
                f"float32 GEMM 5176x384 @ 384x1536, {threads} threads: torch {torch_rate:.0f} "
                f"GFLOP/s, onnxruntime {ort_rate:.0f} GFLOP/s"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
