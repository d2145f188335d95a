"""The CUDA-only decisions, checked on the CPU: device choice, mixed precision and loss
scaling, per-rank seeds, the in-memory/streaming decision under DDP, per-device constants,
host-memory bounds of the decoding pipeline, CPU checkpoints and float32 position embeddings.
What only a GPU can confirm is measured by bench/gpu_report.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from offroad_seg.core import runtime
from offroad_seg.core.distributed import SINGLE, World, rank_seed
from offroad_seg.core.runtime import amp_dtype, amp_dtype_for, grad_scaler, parse_device
from offroad_seg.data.classes import ClassMap
from offroad_seg.data.dataset import list_samples
from offroad_seg.errors import ConfigError
from offroad_seg.features.cache import FeatureCache
from offroad_seg.features.loader import (
    HOST_BYTES_IN_FLIGHT,
    DecodedSamples,
    DecodeOptions,
    collate,
    loader_shape,
    make_loader,
    sample_bytes,
)
from offroad_seg.models.checkpoint import load_checkpoint, save_checkpoint, to_cpu
from offroad_seg.models.preprocess import Preprocessing, normalize
from offroad_seg.training import losses as loss_module
from offroad_seg.training.loop import TrainConfig, train
from offroad_seg.training.sources import FreeMemory, choose_source, decide_source
from tests.conftest import SIZE, interrupted_in_epoch

GB = 10**9

# ----------------------------------------------------------------------------- devices


def test_parse_device_gives_cuda_devices_an_index_and_checks_it():
    assert parse_device("auto", cuda_count=0) == torch.device("cpu")
    assert parse_device("auto", cuda_count=2, current=1) == torch.device("cuda", 1)
    assert parse_device("cuda", cuda_count=2, current=0) == torch.device("cuda", 0)
    assert parse_device("cuda:1", cuda_count=2) == torch.device("cuda", 1)
    assert parse_device("cpu", cuda_count=2) == torch.device("cpu")
    with pytest.raises(
        ConfigError, match=r"cuda:2: this machine has 2 CUDA devices, cuda:0 to cuda:1"
    ):
        parse_device("cuda:2", cuda_count=2)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        parse_device("cuda:0", cuda_count=0)
    with pytest.raises(ConfigError, match="not a device name"):
        parse_device("gpu", cuda_count=1)


def test_resolve_device_makes_an_indexed_cuda_device_current(monkeypatch):
    """`--device cuda:1`: work that names no device (new events, pinned buffers, the
    DataLoader's pinning thread) must go to GPU 1, so resolving sets it current."""
    current = {"index": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.update(index=d.index))
    assert runtime.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert current["index"] == 1
    assert runtime.resolve_device("cuda") == torch.device("cuda", 1)  # the current one
    assert runtime.resolve_device("cuda:0") == torch.device("cuda", 0) and current["index"] == 0
    assert runtime.resolve_device("cpu") == torch.device("cpu") and current["index"] == 0


# ----------------------------------------------------------------------------- precision


def test_bf16_only_where_native_fp16_elsewhere():
    for capability in [(7, 5), (7, 0), (6, 1)]:  # T4, V100, Pascal
        assert amp_dtype_for(capability) == torch.float16
    for capability in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0)]:  # A100, RTX 30/40, H100, B200
        assert amp_dtype_for(capability) == torch.bfloat16
    assert amp_dtype(torch.device("cpu")) is None
    assert not grad_scaler(torch.device("cpu")).is_enabled()


def test_cuda_autocast_type_follows_the_card(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # GradScaler checks it
    card = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert amp_dtype(card) == torch.float16 and grad_scaler(card).is_enabled()  # a T4
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert amp_dtype(card) == torch.bfloat16 and not grad_scaler(card).is_enabled()  # an H100


def test_loss_scaled_training_equals_plain_training_and_resumes(caches, tmp_path, monkeypatch):
    """The fp16 path's loss scaling, on the CPU: scaling by a power of two is exact, so the
    steps equal the unscaled ones; the scaler's state is saved and restored on resume."""
    import offroad_seg.training.loop as th

    def cfg(out, **kw):
        defaults = dict(epochs=2, batch_size=2, progress=False, device="cpu")
        return TrainConfig(caches=(caches["train"],), out=out, **{**defaults, **kw})

    with interrupted_in_epoch(2), pytest.raises(th.Interrupted):  # last.pth holds epoch 1
        train(cfg(tmp_path / "plain"))
    scalers = []

    def cpu_scaler(device):
        scalers.append(torch.amp.GradScaler("cpu", enabled=True, growth_interval=3))
        return scalers[-1]

    monkeypatch.setattr(th, "grad_scaler", cpu_scaler)
    with interrupted_in_epoch(2), pytest.raises(th.Interrupted):
        train(cfg(tmp_path / "scaled"))
    a = load_checkpoint(tmp_path / "plain" / "last.pth").payload
    b = load_checkpoint(tmp_path / "scaled" / "last.pth").payload
    assert a["epoch"] == b["epoch"] == 1
    assert a["history"][0]["train_loss"] == b["history"][0]["train_loss"]
    for k in a["state_dict"]:
        torch.testing.assert_close(b["state_dict"][k], a["state_dict"][k], rtol=0, atol=0)
    assert a["scaler"] == {}
    assert b["scaler"]["scale"] == 2.0**17  # grew once after 3 finite steps
    train(cfg(tmp_path / "scaled", resume=True))
    assert scalers[-1].get_scale() == 2.0**18  # went on from the saved scale, not 2**16


# ----------------------------------------------------------------------------- DDP


def test_rank_seeds_differ_and_rank_0_keeps_the_seed():
    assert rank_seed(7, 0) == 7
    seeds = [rank_seed(7, r) for r in range(64)]
    assert len(set(seeds)) == 64 and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [rank_seed(7, r) for r in range(64)]  # deterministic
    assert rank_seed(8, 1) != rank_seed(7, 1)
    torch.manual_seed(rank_seed(7, 3))  # torch accepts it


def test_decide_source_budget_and_host_staging():
    free = FreeMemory(device=8 * GB, host=10 * GB)
    assert decide_source(3 * GB, free, True, None, False)[0] == "memory"
    assert decide_source(5 * GB, free, True, None, False)[0] == "stream"  # > half the GPU's
    assert decide_source(5 * GB, free, True, 6.0, False)[0] == "memory"  # an explicit budget
    assert decide_source(1 * GB, free, True, None, True) == ("stream", "--stream")
    # fits the GPU, but 4 ranks on the node load 4 copies through 10 GB of RAM first
    kind, why = decide_source(3 * GB, free, True, None, False, local_ranks=4)
    assert kind == "stream" and "host RAM" in why
    # on the CPU the ranks of a node share its RAM: the default budget splits
    cpu = FreeMemory(device=10 * GB, host=10 * GB)
    assert decide_source(2 * GB, cpu, False, None, False, local_ranks=1)[0] == "memory"
    assert decide_source(2 * GB, cpu, False, None, False, local_ranks=4)[0] == "stream"


class TwoRanks(World):
    """One rank of a two-rank world whose collectives are answered from a shared board (the
    ranks run one after the other in this process, rank 0 first)."""

    def __init__(self, rank: int, board: dict):
        super().__init__(rank=rank, size=2, local_rank=rank, local_size=2)
        object.__setattr__(self, "board", board)

    def gather(self, obj):
        self.board["free"][self.rank] = obj
        return list(self.board["free"])

    def broadcast(self, obj):
        if self.rank == 0:
            self.board["decision"] = obj
        return self.board["decision"]


def test_ranks_with_different_free_memory_choose_the_same_source(caches, monkeypatch):
    """Rank 0 sees plenty free, rank 1 little: every rank must stream (each rank deciding
    alone would put them on different sample orders)."""
    cache = FeatureCache.open(caches["train"])
    from offroad_seg.training import sources

    needed = sources.cache_bytes([cache])
    plenty, little = FreeMemory(100 * needed, 100 * needed), FreeMemory(needed, 100 * needed)
    board = {"free": [plenty, little], "decision": None}
    chosen = []
    for rank, free in ((0, plenty), (1, little)):
        monkeypatch.setattr(sources.FreeMemory, "measure", classmethod(lambda cls, d, f=free: f))
        world = TwoRanks(rank, board)
        chosen.append(choose_source([cache], torch.device("cpu"), None, False, 4, False, world))
    assert [s.kind for s in chosen] == ["stream", "stream"]
    # alone, rank 0 would have loaded everything into memory
    assert decide_source(needed, plenty, False, None, False, 2)[0] == "memory"
    single = choose_source([cache], torch.device("cpu"), 1.0, False, 4, False, SINGLE)
    assert single.kind == "memory"


# ----------------------------------------------------------------------------- constants


def test_per_step_constants_are_built_once_per_device():
    """No host-to-device copy per step: the interpolation matrices and the normalisation
    constants are made once per device (keyed by it) and reused."""
    cpu, meta = torch.device("cpu"), torch.device("meta")
    a = loss_module.bilinear_matrix(4, 56, cpu)
    assert loss_module.bilinear_matrix(4, 56, cpu) is a
    on_meta = loss_module.bilinear_matrix(4, 56, meta)
    assert on_meta.device == meta and on_meta is not a
    assert loss_module.bilinear_matrix(4, 56, meta) is on_meta
    # the cached matrix is F.interpolate's bilinear resize
    v = torch.randn(1, 1, 4, 1)
    ref = torch.nn.functional.interpolate(v, size=(56, 1), mode="bilinear", align_corners=False)
    torch.testing.assert_close(a @ v[0, 0], ref[0, 0], rtol=1e-6, atol=1e-6)

    from offroad_seg.models.preprocess import _mean_std

    prep = Preprocessing(size=SIZE)
    images = torch.randint(0, 256, (2, 3, *SIZE), dtype=torch.uint8)
    first = normalize(images, prep)
    hits = _mean_std.cache_info().hits
    second = normalize(images, prep)
    assert _mean_std.cache_info().hits == hits + 1
    assert torch.equal(first, second)
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(prep.std).view(1, 3, 1, 1) * 255.0
    assert torch.equal(first, (images.float() - mean) / std)


# ----------------------------------------------------------------------------- host memory


def test_loader_shape_bounds_decoded_samples_in_flight():
    mb = 10**6
    # CUDA defaults (16 workers, batch 64), evaluate at 960x540: ~0.9 MB per sample
    workers, prefetch = loader_shape(16, 64, int(0.9 * mb))
    assert workers * prefetch * 64 * 0.9 * mb <= HOST_BYTES_IN_FLIGHT
    assert (workers, prefetch) == (16, 1)
    # extract at 960x540 (~0.5 MB): two batches ahead per worker still fit
    workers, prefetch = loader_shape(16, 64, int(0.5 * mb))
    assert (workers, prefetch) == (16, 2)
    # huge images: fewer workers, never none
    assert loader_shape(16, 64, 100 * mb) == (1, 1)
    # the CPU defaults are untouched (one worker, four batches of 8 ahead)
    assert loader_shape(1, 8, int(0.9 * mb)) == (1, 4)
    assert loader_shape(0, 64, mb) == (0, None)


def test_sample_bytes_counts_what_workers_return():
    prep = Preprocessing(size=(266, 476))
    working = DecodeOptions(prep=prep, class_map=ClassMap.default())
    assert sample_bytes(working, (540, 960)) == 4 * 266 * 476
    full = DecodeOptions(prep=prep, class_map=ClassMap.default(), labels="original")
    assert sample_bytes(full, (540, 960)) == 3 * 266 * 476 + 540 * 960
    every = DecodeOptions(prep=prep, keep_original=True)
    assert sample_bytes(every, (540, 960)) == 3 * 266 * 476 + 3 * 540 * 960
    first_few = DecodeOptions(prep=prep, keep_original=True, original_limit=10)
    assert sample_bytes(first_few, (540, 960)) == 3 * 266 * 476


def test_originals_only_for_the_first_images(dataset):
    samples = list_samples(dataset / "train")
    opts = DecodeOptions(
        prep=Preprocessing(size=SIZE),
        class_map=ClassMap.default(),
        labels="original",
        keep_original=True,
        original_limit=2,
    )
    decoded = DecodedSamples(samples, opts)
    items = [decoded[i] for i in range(4)]
    assert ["original" in it for it in items] == [True, True, False, False]
    batch = collate(items)
    assert batch["original"][0].shape == (112, 196, 3) and batch["original"][1] is not None
    assert batch["original"][2] is None and batch["original"][3] is None
    assert batch["image"].shape == (4, 3, *SIZE)
    loader = make_loader(decoded, 3, workers=1, device=torch.device("cpu"))
    assert loader.prefetch_factor == 4 and loader.num_workers == 1
    got = [o for b in loader for o in b.get("original", [None] * len(b["index"]))]
    assert [o is not None for o in got] == [True, True] + [False] * 4


# ----------------------------------------------------------------------------- checkpoints


class OnAccelerator(torch.Tensor):
    """Stands in for a CUDA tensor: reports a CUDA device, and `.cpu()` gives a plain CPU
    tensor (counting the calls). Saved as is, it would not load where its class is unknown,
    as a CUDA tensor does not load on a machine without CUDA."""

    moved = 0

    @property
    def device(self):
        return torch.device("cuda", 0)

    def cpu(self, *args, **kwargs):
        OnAccelerator.moved += 1
        return self.as_subclass(torch.Tensor).clone()


def test_checkpoints_hold_cpu_tensors_only(tmp_path):
    weights = torch.randn(3, 4).as_subclass(OnAccelerator)
    step = torch.tensor(5.0).as_subclass(OnAccelerator)
    payload = {
        "format": "x",
        "state_dict": {"w": weights},
        "optimizer": {"state": {0: {"step": step}}, "groups": [(weights, 1)]},
        "epoch": 3,
    }
    OnAccelerator.moved = 0
    moved = to_cpu(payload)
    assert OnAccelerator.moved == 3
    assert type(moved["state_dict"]["w"]) is torch.Tensor
    assert type(moved["optimizer"]["groups"][0]) is tuple and moved["epoch"] == 3
    assert torch.equal(moved["state_dict"]["w"], weights.as_subclass(torch.Tensor))

    save_checkpoint(tmp_path / "a.pth", payload)
    loaded = torch.load(tmp_path / "a.pth", weights_only=True)  # no map_location needed
    assert type(loaded["state_dict"]["w"]) is torch.Tensor
    assert loaded["optimizer"]["state"][0]["step"].item() == 5.0
    # the same payload saved without to_cpu does not load (the control: the test can fail)
    torch.save(payload, tmp_path / "b.pth")
    with pytest.raises(Exception, match="OnAccelerator|Unsupported|weights_only"):
        torch.load(tmp_path / "b.pth", weights_only=True)


# ----------------------------------------------------------------------------- backbone


def test_position_embeddings_added_in_float32_under_autocast(backbone):
    """Under bf16 autocast the patch projection comes out in bf16; the tokens that enter the
    blocks must be its float32 value plus the float32 position embeddings (official/timm)."""
    x = torch.randn(2, 3, *SIZE)
    seen = {}
    hook = backbone.vit.norm_pre.register_forward_hook(lambda m, i, o: seen.update(t=i[0]))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            backbone(x)
            patches = backbone.vit.patch_embed(x)
    finally:
        hook.remove()
    assert patches.dtype == torch.bfloat16 and seen["t"].dtype == torch.float32
    rows, cols = SIZE[0] // 14, SIZE[1] // 14
    expected = patches.reshape(2, rows * cols, -1).float()
    expected = expected + backbone.patch_pos_embed(rows, cols, x.device)
    torch.testing.assert_close(seen["t"][:, 1:], expected, rtol=0, atol=0)
    assert np.isfinite(seen["t"].numpy()).all()
