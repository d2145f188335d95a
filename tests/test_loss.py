import pytest
import torch
import torch.nn.functional as F

from offroad_seg.loss import bilinear_matrix, loss_terms, segmentation_loss


def reference(logits, labels, weight):
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(up, labels.long(), weight=weight, ignore_index=255)


@pytest.mark.parametrize(
    "grid,size", [((4, 7), (56, 98)), ((19, 34), (266, 476)), ((3, 5), (10, 13))]
)
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_loss_equals_interpolate_plus_cross_entropy(grid, size, weighted):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 6, *grid, generator=g, dtype=torch.float64)).float()
    labels = torch.randint(0, 6, (2, *size), generator=g)
    labels[0, :3] = 255
    weight = torch.rand(6, generator=g) + 0.1 if weighted else None
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    ours = segmentation_loss(a, labels.to(torch.uint8), weight)
    ref = reference(b, labels, weight)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


def test_bilinear_matrix_equals_interpolate():
    v = torch.randn(3, 19)
    r = bilinear_matrix(19, 266, torch.device("cpu"))
    ref = F.interpolate(v[None], size=266, mode="linear", align_corners=False)[0]
    torch.testing.assert_close(v @ r.t(), ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(r.sum(1), torch.ones(266))


def test_loss_terms_sum_over_batches():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5, 3, 4, generator=g)
    labels = torch.randint(0, 5, (4, 21, 28), generator=g)
    labels[1] = 255
    w = torch.rand(5, generator=g)
    total, count = loss_terms(logits, labels, w)
    parts = [loss_terms(logits[i : i + 1], labels[i : i + 1], w) for i in range(4)]
    torch.testing.assert_close(total, sum(p[0] for p in parts))
    torch.testing.assert_close(count, sum(p[1] for p in parts))
    torch.testing.assert_close(total / count, reference(logits, labels, w))


def test_all_ignored_batch_gives_zero_loss_not_nan():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((1, 14, 14), 255, dtype=torch.uint8), None)
    loss.backward()
    assert loss.item() == 0 and torch.all(logits.grad == 0)
