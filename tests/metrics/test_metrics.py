import numpy as np
import torch

from offroad_seg.metrics.confusion import ConfusionAccumulator, SegMetrics, confusion_matrix


def numpy_metrics(pred: np.ndarray, truth: np.ndarray, k: int) -> dict:
    """Direct computation, class by class, straight from the definitions."""
    keep = truth != 255
    p, t = pred[keep], truth[keep]
    iou, dice, acc = {}, {}, {}
    for c in range(k):
        tp = np.sum((p == c) & (t == c))
        fp = np.sum((p == c) & (t != c))
        fn = np.sum((p != c) & (t == c))
        if tp + fp + fn:
            iou[c] = tp / (tp + fp + fn)
            dice[c] = 2 * tp / (2 * tp + fp + fn)
        if np.sum(t == c):
            acc[c] = tp / np.sum(t == c)
    return {
        "iou": iou,
        "miou": np.mean(list(iou.values())),
        "dice": np.mean(list(dice.values())),
        "pixel_acc": np.mean(p == t),
        "class_acc": np.mean(list(acc.values())),
    }


def random_case(seed: int, k: int = 6):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k - 1, (5, 30, 40))  # class k-1 never in truth
    truth[rng.random(truth.shape) < 0.1] = 255
    pred = np.where(rng.random(truth.shape) < 0.6, truth, rng.integers(0, k, truth.shape))
    pred[pred == 255] = 0
    pred[:, :, :2] = 3  # structured errors too
    return pred, truth


def test_metrics_equal_numpy_definitions():
    k = 6
    pred, truth = random_case(0, k)
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(truth), k)
    m = SegMetrics.from_confusion(cm.numpy())
    ref = numpy_metrics(pred, truth, k)
    for c in range(k):
        if c in ref["iou"]:
            assert m.iou[c] == ref["iou"][c]
        else:
            assert np.isnan(m.iou[c])
    np.testing.assert_allclose(m.miou, ref["miou"], rtol=1e-12)
    np.testing.assert_allclose(m.mean_dice, ref["dice"], rtol=1e-12)
    np.testing.assert_allclose(m.pixel_accuracy, ref["pixel_acc"], rtol=1e-12)
    np.testing.assert_allclose(m.mean_class_accuracy, ref["class_acc"], rtol=1e-12)
    assert cm.sum() == np.sum(truth != 255)


def test_class_only_in_prediction_counts_with_iou_zero():
    truth = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])
    m = SegMetrics.from_confusion(confusion_matrix(pred, truth, 4).numpy())
    assert m.iou[2] == 0 and np.isnan(m.iou[3])
    np.testing.assert_allclose(m.miou, (0.5 + 1.0 + 0.0) / 3)


def test_metrics_do_not_depend_on_batch_size():
    k = 6
    pred, truth = random_case(1, k)
    results = []
    for bs in (1, 2, 5):
        acc = ConfusionAccumulator(k)
        for s in range(0, len(pred), bs):
            acc.update(torch.from_numpy(pred[s : s + bs]), torch.from_numpy(truth[s : s + bs]))
        results.append(acc.compute())
    for r in results[1:]:
        np.testing.assert_array_equal(r.confusion, results[0].confusion)
        assert r.miou == results[0].miou


def test_to_dict_and_table():
    pred, truth = random_case(2)
    m = SegMetrics.from_confusion(
        confusion_matrix(torch.from_numpy(pred), torch.from_numpy(truth), 6).numpy(),
        names=list("abcdef"),
        loss=0.5,
    )
    d = m.to_dict()
    assert d["per_class"]["f"]["truth_pixels"] == 0
    assert d["miou"] == m.miou and d["loss"] == 0.5
    assert "Mean IoU" in m.table() and "f " in m.table()


def test_to_dict_round_trips():
    rng = np.random.default_rng(3)
    cm = rng.integers(0, 50, size=(5, 5))
    cm[4] = 0  # a class absent from ground truth
    m = SegMetrics.from_confusion(cm, list("abcde"), loss=0.25)
    back = SegMetrics.from_dict(m.to_dict())
    np.testing.assert_array_equal(back.confusion, cm)
    assert back.names == m.names and back.loss == 0.25
    assert back.table() == m.table()
