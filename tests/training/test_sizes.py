"""Training on caches of several working sizes (scale augmentation): batches of one size,
every sample once per epoch, deterministic; the head's working size and the sizes it was
trained at are recorded; caches that differ in more than their size are refused."""

import json

import numpy as np
import pytest
import torch

from offroad_seg.errors import CacheError
from offroad_seg.features.cache import FeatureCache
from offroad_seg.features.extract import extract
from offroad_seg.models.checkpoint import load_checkpoint
from offroad_seg.training.loop import TrainConfig, train
from offroad_seg.training.sources import InMemorySource, StreamingSource, size_batches
from tests.conftest import SIZE, extract_config

SMALL = (42, 84)  # 3x6 tokens: the session train split again, at 0.75x the working size


@pytest.fixture(scope="module")
def small_cache(dataset, tmp_path_factory):
    path = tmp_path_factory.mktemp("sizes") / "train-small.zarr"
    extract(extract_config(dataset / "train", path, size=SMALL))
    return path


def test_size_batches_never_mix_and_cover_every_position():
    groups = np.array([0, 1, 1, 0, 0, 1, 0, 0, 1])
    batches = size_batches(groups, 2)
    assert all(len(set(groups[b])) == 1 for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(groups)))
    # full batches in the order they fill up, then each group's remainder in group order
    assert [b.tolist() for b in batches] == [[1, 2], [0, 3], [4, 6], [5, 8], [7]]
    # one group: consecutive runs, as training on one cache always did
    assert [b.tolist() for b in size_batches(np.zeros(5, int), 2)] == [[0, 1], [2, 3], [4]]


def _sample_ids(batch, stored):
    """(cache, image) of each sample of a batch, by matching its features to a cached view."""
    ids = []
    for row in batch.flatten(1):
        hits = [
            (c, i)
            for c, feats in enumerate(stored)
            if feats.shape[-2:] == batch.shape[-2:]
            for i in range(len(feats))
            for v in range(feats.shape[1])
            if torch.equal(torch.from_numpy(feats[i, v].astype(np.float32)).flatten(), row)
        ]
        assert len(hits) == 1
        ids.append(hits[0])
    return ids


def test_two_sizes_give_one_size_batches_covering_every_sample(caches, small_cache):
    opened = [FeatureCache.open(caches["train"]), FeatureCache.open(small_cache)]
    stored = [c.load()[0] for c in opened]
    memory = InMemorySource(opened, torch.device("cpu"), progress=False)
    epoch1 = list(memory.batches(seed=3, epoch=1, batch_size=4))
    shapes = [tuple(f.shape[-2:]) for f, _ in epoch1]
    assert set(shapes) == {(4, 7), (3, 6)}  # batches of one size each, both sizes seen
    assert all(tuple(lab.shape[-2:]) in (SIZE, SMALL) for _, lab in epoch1)
    ids = [i for f, _ in epoch1 for i in _sample_ids(f, stored)]
    assert sorted(ids) == [(c, i) for c in range(2) for i in range(6)]  # each once
    again = list(memory.batches(seed=3, epoch=1, batch_size=4))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch1, again, strict=True))
    other = [f for f, _ in memory.batches(seed=3, epoch=2, batch_size=4)]
    assert [f.shape for f, _ in epoch1] != [f.shape for f in other] or not all(
        torch.equal(a[0], b) for a, b in zip(epoch1, other, strict=True)
    )
    # streaming takes the same samples in the same batches (its order shuffles chunks, so it
    # is its own; one window of every chunk gives the in-memory grouping of its order)
    stream = StreamingSource(opened, torch.device("cpu"), window=1)
    streamed = list(stream.batches(seed=3, epoch=1, batch_size=4))
    assert all(len({tuple(f.shape[-2:])}) == 1 for f, _ in streamed)
    ids = [i for f, _ in streamed for i in _sample_ids(f, stored)]
    assert sorted(ids) == [(c, i) for c in range(2) for i in range(6)]


def test_training_on_two_sizes_records_them(caches, small_cache, tmp_path):
    cfg = TrainConfig(
        caches=(caches["train"], small_cache), out=tmp_path / "run", val_cache=caches["val"],
        epochs=1, batch_size=4, progress=False, device="cpu",
    )  # fmt: skip
    result = train(cfg)
    ckpt = load_checkpoint(tmp_path / "run" / "segmentation_head.pth")
    assert tuple(ckpt.preprocessing.size) == SIZE  # the validation cache's
    assert ckpt.payload["train_sizes"] == [list(SIZE), list(SMALL)]
    record = json.loads((tmp_path / "run" / "train_stats" / "config.json").read_text())
    assert record["train_sizes"] == [list(SIZE), list(SMALL)]
    # 6 + 6 images in batches of 4 never mixing sizes: 2 + 2 steps
    assert len(result.step_losses) == 4
    text = (tmp_path / "run" / "train_stats" / "evaluation_metrics.txt").read_text()
    assert "size: 56x98 (trained at 56x98, 42x84)" in text


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ({"class_map": "hackathon"}, "class map: 10 classes vs 11"),
        ({"backbone": "dinov2_vits14_reg"}, "backbone dinov2_vits14_reg vs dinov2_vits14"),
    ],
    ids=["class_map", "backbone"],
)
def test_caches_differing_in_more_than_size_refused(
    setting, expected, dataset, small_cache, tmp_path
):
    other = tmp_path / "other.zarr"
    extract(extract_config(dataset / "val", other, size=(70, 112), **setting))
    cfg = TrainConfig(caches=(small_cache, other), out=tmp_path / "r", progress=False, device="cpu")
    with pytest.raises(CacheError) as info:
        train(cfg)
    message = str(info.value)
    assert "\n" not in message and str(other) in message and str(small_cache) in message
    assert expected in message and "size" not in message.split("differ: ")[-1]
