"""int8 caches: quantisation error bounds, the cache round trip, and training unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from offroad_seg.features.cache import FeatureCache
from offroad_seg.features.extract import extract
from offroad_seg.features.quantize import QMAX, dequantize, quantize_int8
from offroad_seg.training.sources import (
    InMemorySource,
    StreamingSource,
    epoch_order,
    view0_features,
)
from tests.conftest import extract_config


def test_quantize_error_is_at_most_half_a_step_per_token_and_layer():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 8 * 4, 5, 6, generator=g) * torch.rand(3, 2, 1, 5, 6, generator=g) * 10
    x[0, 0, :, 0, 0] = 0  # an all-zero token
    x[1, 1, 8:16] *= 100  # one layer of a stack much larger than the others
    q, s = quantize_int8(x, layers=4)
    assert q.dtype == torch.int8 and q.shape == x.shape and s.shape == (3, 2, 4, 5, 6)
    assert q.abs().max() <= QMAX
    back = dequantize(q, s)
    step = s.repeat_interleave(8, dim=2)  # each layer's scale over its 8 channels
    assert torch.all((back - x).abs() <= step / 2 + 1e-6 * x.abs())
    assert torch.all(back[0, 0, :, 0, 0] == 0)
    # per layer: the large layer does not flatten its neighbours' precision
    small = x[1, 1, :8]
    assert (back[1, 1, :8] - small).abs().max() <= small.abs().amax(0).max() / QMAX
    # relative error of Gaussian-like features: well under 1%
    y = torch.randn(4, 384, 19, 34, generator=g)
    qy, sy = quantize_int8(y, layers=1)
    assert float((dequantize(qy, sy) - y).norm() / y.norm()) < 0.01
    assert torch.equal(dequantize(y, None), y)


@pytest.fixture(scope="module")
def int8_cache(dataset, tmp_path_factory):
    path = tmp_path_factory.mktemp("int8") / "train.zarr"
    extract(
        extract_config(dataset / "train", path, dtype="int8", layers=4, views=("identity", "hflip"))
    )
    return path


def test_int8_cache_round_trip(int8_cache, dataset, tmp_path):
    cache = FeatureCache.open(int8_cache)
    assert cache.spec.quantized and cache.array("features").dtype == np.int8
    assert cache.array("scales").shape == (6, 2, 4, 4, 7)
    fp32 = tmp_path / "fp32.zarr"
    views = ("identity", "hflip")
    extract(extract_config(dataset / "train", fp32, dtype="float32", layers=4, views=views))
    exact, labels = FeatureCache.open(fp32).load()
    deq, labels8 = cache.load()
    np.testing.assert_array_equal(labels8, labels)
    stored, _ = cache.load_stored()
    step = np.repeat(stored.scales, exact.shape[2] // 4, axis=2)
    assert np.all(np.abs(deq - exact) <= step / 2 + 1e-6)
    rel = np.linalg.norm(deq - exact) / np.linalg.norm(exact)
    assert rel < 0.01
    # the readers agree with each other
    f0, _ = cache.read_chunk(0)
    np.testing.assert_array_equal(f0, deq[: len(f0)])
    assert cache.verify(progress=False).ok
    info = cache.info()
    assert info["features"]["dtype"] == "int8" and info["features"]["scales"] == [6, 2, 4, 4, 7]
    # an int8 cache is about a quarter of a float32 one on disk (scales included)
    assert cache.bytes_on_disk() < 0.5 * FeatureCache.open(fp32).bytes_on_disk()


def test_int8_sources_give_the_dequantized_features(int8_cache):
    cache = FeatureCache.open(int8_cache)
    deq, _ = cache.load()
    cpu = torch.device("cpu")
    memory = InMemorySource([cache], cpu, progress=False)
    perm, views = epoch_order(memory.num_views, seed=3, epoch=1)
    expected = torch.from_numpy(deq[perm.numpy(), views.numpy()])
    got = torch.cat([f for f, _ in memory.batches(3, 1, 4)])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    stream = StreamingSource([cache], cpu, window=2)
    plan, _ = stream.epoch_plan(3, 1)
    expected = torch.from_numpy(deq[plan[:, 1], plan[:, 2]])
    got = torch.cat([f for f, _ in stream.batches(3, 1, 4)])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    feats, _ = view0_features(cache)
    torch.testing.assert_close(feats.float(), torch.from_numpy(deq[:, 0]), rtol=0, atol=0)


def test_damaged_scales_chunk_is_named(int8_cache, tmp_path):
    import shutil

    copy = tmp_path / "damaged.zarr"
    shutil.copytree(int8_cache, copy)
    chunk = copy / "scales" / "c.0.0.0.0.0"  # a shard holding one chunk (format 2)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the chunk, before the shard's index
    chunk.write_bytes(bytes(data))
    report = FeatureCache.open(copy).verify(progress=False)
    assert any(p.startswith("scales chunk") and "unreadable" in p for p in report.problems)
