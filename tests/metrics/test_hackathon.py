"""The hackathon protocol, against a reference that follows the starter's rules literally:
torchvision `Resize` + `ToTensor` on PIL id images, `F.interpolate` + argmax for predictions, a
DataLoader of batches of 2 in sorted name order, numpy IoU/Dice/accuracy per batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from offroad_seg.data.classes import ClassMap
from offroad_seg.metrics.confusion import SegMetrics, confusion_matrix
from offroad_seg.metrics.hackathon import (
    HACKATHON_TITLE,
    HackathonMetrics,
    hackathon_image_counts,
    hackathon_prediction,
    hackathon_scores,
    hackathon_truth,
    to_hackathon_ids,
)

# The starter's value map; everything else (Flowers 600 included) stays 0.
VALUE_MAP = {0: 0, 100: 1, 200: 2, 300: 3, 500: 4, 550: 5, 700: 6, 800: 7, 7100: 8, 10000: 9}
K = 10
SIZE = (14, 28)  # working size of the random cases (rows x cols)
GRID = (4, 7)  # token grid of the random logits


# ----------------------------------------------------------------------------- reference


def ref_convert(codes: np.ndarray) -> np.ndarray:
    new = np.zeros(codes.shape, dtype=np.uint8)
    for raw, new_id in VALUE_MAP.items():
        new[codes == raw] = new_id
    return new


def ref_truth(codes: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    mask_transform = transforms.Compose([transforms.Resize(size), transforms.ToTensor()])
    return (mask_transform(Image.fromarray(ref_convert(codes))) * 255).squeeze(0).long()


def ref_pred(logits: torch.Tensor, size: tuple[int, int], class_map: ClassMap) -> torch.Tensor:
    out = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)
    ids = torch.argmax(out, dim=1)[0].numpy()
    return torch.from_numpy(ref_convert(class_map.codes[ids]).astype(np.int64))


def ref_scores(cases: dict, size: tuple[int, int], class_map: ClassMap) -> dict:
    """cases: name -> (raw codes at the original size, token logits of the model)."""
    names = sorted(cases)
    pairs = [(ref_pred(cases[n][1], size, class_map), ref_truth(cases[n][0], size)) for n in names]
    mious, dices, accs, ious = [], [], [], []
    for pred, truth in DataLoader(pairs, batch_size=2, shuffle=False):
        p, t = pred.numpy().ravel(), truth.numpy().ravel()
        iou, dice = [], []
        for c in range(K):
            inter = np.sum((p == c) & (t == c))
            union = np.sum((p == c) | (t == c))
            iou.append(np.nan if union == 0 else inter / union)
            dice.append((2 * inter + 1e-6) / (np.sum(p == c) + np.sum(t == c) + 1e-6))
        ious.append(iou)
        mious.append(np.nanmean(iou))
        dices.append(np.mean(dice))
        accs.append(np.mean(p == t))
    ious = np.array(ious)
    class_iou = [np.nanmean(col) if not np.isnan(col).all() else np.nan for col in ious.T]
    return {
        "miou": np.mean(mious),
        "dice": np.mean(dices),
        "pixel_accuracy": np.mean(accs),
        "class_iou": class_iou,
        "batch_iou": ious,
        "num_batches": len(mious),
    }


# ----------------------------------------------------------------------------- random cases


def blocky_codes(rng, shape, codes, block=6) -> np.ndarray:
    """Regions of random codes (blocks of ~`block` pixels), cropped to `shape`."""
    rows, cols = -(-shape[0] // block), -(-shape[1] // block)
    small = rng.choice(codes, size=(rows, cols))
    return np.kron(small, np.ones((block, block), dtype=np.int64))[: shape[0], : shape[1]]


def random_cases(seed: int, class_map: ClassMap, n: int = 5) -> dict:
    """Images of different sizes, named out of order. Flowers (600) and an unknown code (4242)
    in the masks; Sky (10000) never in a mask and never predicted (the highest id: the only one
    that the bilinear resize cannot create between two others); the last batch's images hold
    only Background and Trees (adjacent ids), predicted with little noise, so other classes are
    absent from that batch only."""
    rng = np.random.default_rng(seed)
    shapes = [(30, 52), (27, 48), (40, 40), (33, 61), (24, 44), (19, 35), (45, 80)]
    common = [0, 100, 200, 300, 500, 550, 600, 800, 7100, 4242]
    names = [f"img_{j}.png" for j in rng.permutation(n)]
    last_batch = sorted(names)[(n - 1) // 2 * 2 :]
    cases = {}
    for shape, name in zip(shapes, names, strict=False):
        simple = name in last_batch
        codes = blocky_codes(rng, shape, [0, 100] if simple else common)
        # noise plus a bonus for the mask's class at each token's centre: mostly right
        rows = ((np.arange(GRID[0]) + 0.5) * shape[0] / GRID[0]).astype(int)
        cols = ((np.arange(GRID[1]) + 0.5) * shape[1] / GRID[1]).astype(int)
        truth_ids = class_map.codes_to_ids(codes[np.ix_(rows, cols)], ignore_unknown=True)
        noise = 0.05 if simple else 1.0
        logits = noise * rng.normal(size=(class_map.num_classes, *GRID)).astype(np.float32)
        known = truth_ids < class_map.num_classes
        rows, cols = np.nonzero(known)
        logits[truth_ids[known], rows, cols] += 1.5
        logits[class_map.names.index("Sky")] = -50.0
        cases[name] = (codes, torch.from_numpy(logits))
    return cases


def our_scores(cases: dict, size: tuple[int, int], class_map: ClassMap) -> HackathonMetrics:
    """Counted per image in a shuffled order, scored at the end."""
    counts = {}
    names = list(cases)
    for name in reversed(names):
        codes, logits = cases[name]
        pred = hackathon_prediction(logits[None], size, class_map)[0]
        counts[name] = hackathon_image_counts(pred, hackathon_truth(codes, size))
    return hackathon_scores(names, counts)


@pytest.mark.parametrize(
    "class_map", [ClassMap.default(), ClassMap.hackathon()], ids=["default", "hackathon"]
)
@pytest.mark.parametrize("n", [5, 4])
def test_scores_equal_the_literal_reference(class_map, n):
    cases = random_cases(n, class_map, n)
    ref = ref_scores(cases, SIZE, class_map)
    ours = our_scores(cases, SIZE, class_map)
    assert ours.num_batches == ref["num_batches"] == math.ceil(n / 2)
    assert ours.num_images == n
    np.testing.assert_allclose(ours.miou, ref["miou"], rtol=1e-12)
    np.testing.assert_allclose(ours.dice, ref["dice"], rtol=1e-12)
    np.testing.assert_allclose(ours.pixel_accuracy, ref["pixel_accuracy"], rtol=1e-12)
    np.testing.assert_allclose(ours.class_iou, ref["class_iou"], rtol=1e-12)
    # the cases hold what they are meant to: Sky absent from both in every batch (IoU NaN,
    # Dice 1), another class absent from some batches only, and scores neither 0 nor 1
    absent = np.isnan(ref["batch_iou"])
    assert absent[:, 9].all() and np.isnan(ours.class_iou[9])
    assert (absent[:, :9].any(0) & ~absent[:, :9].all(0)).any()
    assert 0.2 < ours.miou < 0.9 and 0.2 < ours.pixel_accuracy < 0.95


def test_truth_equals_torchvision_per_image_at_the_default_size():
    rng = np.random.default_rng(7)
    codes = blocky_codes(rng, (540, 960), [*VALUE_MAP, 600, 4242], block=37)
    np.testing.assert_array_equal(hackathon_truth(codes, (266, 476)), ref_truth(codes, (266, 476)))
    for shape, size in [((30, 52), SIZE), ((9, 9), (20, 13)), (SIZE, SIZE)]:
        codes = blocky_codes(rng, shape, [*VALUE_MAP, 600], block=3)
        truth = hackathon_truth(codes, size)
        assert truth.shape == size and truth.dtype == np.int64
        np.testing.assert_array_equal(truth, ref_truth(codes, size))


def test_prediction_equals_interpolate_argmax_and_works_on_numpy():
    rng = np.random.default_rng(3)
    cm = ClassMap.default()
    logits = torch.from_numpy(rng.normal(size=(3, cm.num_classes, *GRID)).astype(np.float32))
    pred = hackathon_prediction(logits, SIZE, cm)
    assert pred.shape == (3, *SIZE) and pred.dtype == torch.int64
    for j in range(3):
        np.testing.assert_array_equal(pred[j], ref_pred(logits[j], SIZE, cm))
    ids = F.interpolate(logits, size=SIZE, mode="bilinear", align_corners=False).argmax(1)
    np.testing.assert_array_equal(to_hackathon_ids(ids.numpy(), cm), pred.numpy())
    tied = torch.zeros(1, cm.num_classes, *GRID)
    tied[:, [3, 5]] = 1.0  # equal maxima: the first, as argmax
    assert hackathon_prediction(tied, SIZE, cm).unique().tolist() == [3]


def test_to_tensor_round_trip_keeps_every_uint8_value():
    """ToTensor's float32 /255, the starter's *255 and the truncation to long change no value
    (3/255*255 included), so resized ids can be used as they are."""
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    back = (transforms.ToTensor()(Image.fromarray(values)) * 255).long()[0]
    np.testing.assert_array_equal(back.numpy(), values)


def test_bilinear_truth_has_in_between_ids_at_a_boundary():
    """A Background | Sky edge (ids 0 | 9) resized bilinearly creates ids of other classes."""
    codes = np.zeros((4, 8), dtype=np.int64)
    codes[:, 4:] = 10000
    down = hackathon_truth(codes, (4, 6))
    np.testing.assert_array_equal(down, np.tile([0, 0, 1, 8, 9, 9], (4, 1)))  # Trees, Landscape
    up = hackathon_truth(codes[:, 3:5], (2, 6))  # a 1 x 2 edge stretched to 6 columns
    assert set(np.unique(up)) - {0, 9}, up
    np.testing.assert_array_equal(up, ref_truth(codes[:, 3:5], (2, 6)))


def test_class_maps_to_hackathon_ids():
    default = ClassMap.default()
    expected = [0, 1, 2, 3, 4, 5, 0, 6, 7, 8, 9]  # Flowers (id 6) is Background
    ids = np.arange(default.num_classes)
    np.testing.assert_array_equal(to_hackathon_ids(ids, default), expected)
    out = to_hackathon_ids(torch.from_numpy(ids).to(torch.uint8), default)
    assert out.dtype == torch.int64 and out.tolist() == expected
    np.testing.assert_array_equal(to_hackathon_ids(np.arange(K), ClassMap.hackathon()), range(K))
    custom = ClassMap.from_dict(
        [
            {"code": 10000, "name": "Sky", "color": [0, 0, 255]},
            {"code": 600, "name": "Flowers", "color": [255, 0, 255]},
            {"code": 100, "name": "Trees", "color": [0, 255, 0]},
        ]
    )
    assert to_hackathon_ids(np.array([[0, 1, 2]]), custom).tolist() == [[9, 0, 1]]


def test_image_counts_layout_and_torch_equals_numpy():
    pred = np.array([[9, 9, 1], [0, 1, 1]])
    truth = np.array([[9, 9, 9], [0, 0, 1]])
    counts = hackathon_image_counts(pred, truth)
    assert counts.dtype == np.int64 and counts.shape == (3 * K + 2,)
    inter, npred, ntruth = counts[:K], counts[K : 2 * K], counts[2 * K : 3 * K]
    assert inter[[0, 1, 9]].tolist() == [1, 1, 2] and inter.sum() == 4
    assert npred[[0, 1, 9]].tolist() == [1, 3, 2] and ntruth[[0, 1, 9]].tolist() == [2, 1, 3]
    assert counts[3 * K :].tolist() == [4, 6]  # correct, all pixels
    np.testing.assert_array_equal(
        hackathon_image_counts(torch.from_numpy(pred), torch.from_numpy(truth)), counts
    )
    np.testing.assert_array_equal(hackathon_image_counts(torch.from_numpy(pred), truth), counts)
    for bad in (np.array([[9, 10, 1], [0, 1, 1]]), np.array([[9, -1, 1], [0, 1, 1]])):
        with pytest.raises(ValueError, match="outside"):
            hackathon_image_counts(bad, truth)
        with pytest.raises(ValueError, match="outside"):
            hackathon_image_counts(torch.from_numpy(bad), torch.from_numpy(truth))
    with pytest.raises(ValueError, match="truth"):
        hackathon_image_counts(pred, truth[:1])


# ----------------------------------------------------------------------------- worked example


def worked_example(names=("a.png", "b.png", "c.png")):
    """Three 1 x 4 images at the working size (no resize): a and b all Sky, predicted right;
    c has one Rocks pixel, predicted Sky."""
    truth = {names[0]: [9, 9, 9, 9], names[1]: [9, 9, 9, 9], names[2]: [7, 9, 9, 9]}
    pred = {n: [9, 9, 9, 9] for n in names}
    return {n: (np.array([pred[n]]), np.array([truth[n]])) for n in names}


def test_worked_example_per_batch_means_differ_from_one_confusion_matrix():
    images = worked_example()
    counts = {n: hackathon_image_counts(p, t) for n, (p, t) in images.items()}
    m = hackathon_scores(list(images), counts)
    # batch {a, b}: Sky IoU 1 -> mIoU 1; batch {c}: Sky 3/4, Rocks 0 -> mIoU 0.375
    assert m.num_batches == 2
    assert m.miou == pytest.approx((1.0 + 0.375) / 2) == 0.6875
    # Dice: 9 absent classes score 1; batch {c}: Sky 6/7, Rocks 0
    assert m.dice == pytest.approx((1.0 + (8 + 6 / 7) / 10) / 2)
    assert m.pixel_accuracy == pytest.approx((1.0 + 0.75) / 2)
    # one confusion matrix over the 12 pixels: Sky 11/12, Rocks 0
    pred = np.concatenate([p for p, _ in images.values()], axis=1)
    truth = np.concatenate([t for _, t in images.values()], axis=1)
    pooled = SegMetrics.from_confusion(
        confusion_matrix(torch.from_numpy(pred), torch.from_numpy(truth), K).numpy()
    )
    assert pooled.miou == pytest.approx((11 / 12 + 0) / 2)
    assert pooled.mean_dice == pytest.approx((22 / 23 + 0) / 2)
    assert pooled.pixel_accuracy == pytest.approx(11 / 12)
    # the same pixels, c renamed to sort second: batches {a, c}, {b}
    renamed = worked_example(("a.png", "c.png", "b.png"))
    counts = {n: hackathon_image_counts(p, t) for n, (p, t) in renamed.items()}
    m2 = hackathon_scores(list(renamed), counts)
    assert m2.miou == pytest.approx(((7 / 8 + 0) / 2 + 1.0) / 2) == 0.71875


# ----------------------------------------------------------------------------- scores API


def test_scores_sort_names_and_accept_lists_and_dicts():
    images = worked_example()
    names = list(images)
    counts = [hackathon_image_counts(p, t) for p, t in images.values()]
    by_dict = hackathon_scores(names, dict(zip(names, counts, strict=True)))
    by_list = hackathon_scores(names, counts)
    shuffled = hackathon_scores(names[::-1], counts[::-1])
    assert by_dict.to_dict() == by_list.to_dict() == shuffled.to_dict()
    with pytest.raises(ValueError, match="duplicate"):
        hackathon_scores(["a", "a"], counts[:2])
    with pytest.raises(ValueError, match="no counts for c.png"):
        hackathon_scores(names, dict(zip(names[:2], counts[:2], strict=True)))
    with pytest.raises(ValueError, match="2 counts for 3 names"):
        hackathon_scores(names, counts[:2])
    with pytest.raises(ValueError, match="3K"):
        hackathon_scores(["a"], [np.zeros(7, np.int64)])


def test_metrics_dict_round_trip_and_table():
    images = worked_example()
    m = hackathon_scores(list(images), [hackathon_image_counts(p, t) for p, t in images.values()])
    d = m.to_dict()
    assert d["miou"] == 0.6875 and d["num_batches"] == 2 and d["batch_size"] == 2
    assert d["per_class_iou"]["Sky"] == pytest.approx((1 + 0.75) / 2)
    assert d["per_class_iou"]["Rocks"] == 0.0 and d["per_class_iou"]["Logs"] is None
    back = HackathonMetrics.from_dict(d)
    assert back.to_dict() == d and back.table() == m.table()
    table = m.table()
    assert table.splitlines()[0] == HACKATHON_TITLE == "hackathon protocol (for comparison only)"
    assert "0.6875" in table and "2 batches of 2 images" in table
    assert any(line.startswith("Logs") and "n/a" in line for line in table.splitlines())


def test_truth_from_ids_of_a_map_holding_every_hackathon_code_equals_truth_from_codes():
    """Evaluation may hold ids of the model's map rather than raw codes: for maps holding the 10
    hackathon codes (default, hackathon) going back through `ids_to_codes` changes nothing,
    ignored unknown codes included (ignore -> code 0 -> Background, as the starter does)."""
    rng = np.random.default_rng(11)
    codes = blocky_codes(rng, (30, 52), [*VALUE_MAP, 600, 4242], block=4)
    expected = hackathon_truth(codes, SIZE)
    for cm in (ClassMap.default(), ClassMap.hackathon()):
        back = cm.ids_to_codes(cm.codes_to_ids(codes, ignore_unknown=True))
        np.testing.assert_array_equal(hackathon_truth(back, SIZE), expected)
