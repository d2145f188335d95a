import pytest
import torch
import torch.nn.functional as F

from offroad_seg.errors import ConfigError
from offroad_seg.models.upsampling import bilinear_matrix
from offroad_seg.training.losses import (
    LOSS_TERMS,
    Criterion,
    LossSpec,
    loss_terms,
    segmentation_loss,
)


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


# ----------------------------------------------------------------------------- combinable losses
#
# References, written independently of the implementation: F.interpolate + softmax in float64 and
# each loss from its textbook definition (explicit loops over classes, sorting). The criterion
# runs in float32 (float32 upsampling matrices) on float32 logits, so it can only match them to
# float32 rounding (unit roundoff 6e-8): values to rtol 1e-6 (observed <= 1.2e-7: the sums are
# accumulated in float32 over <= 11k pixels) and gradients w.r.t. the logits to atol 2e-8 +
# rtol 1e-4 (observed <= 5e-9 absolute, where the largest gradients are 1e-3 to 4e-2: each
# logit's gradient sums the float32 contributions of ~200 upsampled pixels).

VALUE_TOL = {"rtol": 1e-6, "atol": 1e-9}
GRAD_TOL = {"rtol": 1e-4, "atol": 2e-8}
K = 6
SHAPES = [((3, 5), (10, 13)), ((4, 7), (56, 98))]


def ref_probs(logits, labels):
    up = F.interpolate(logits.double(), labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.softmax(up, 1), labels.long()


def ref_ce(logits, labels, weight, gamma):
    logp = torch.log(ref_probs(logits, labels)[0])
    w = None if weight is None else weight.double()
    return F.nll_loss(logp, labels.long(), weight=w, ignore_index=255, reduction="sum")


def ref_focal(logits, labels, weight, gamma):
    probs, lab = ref_probs(logits, labels)
    valid = lab != 255
    w = torch.ones(K, dtype=torch.float64) if weight is None else weight.double()
    total = torch.zeros((), dtype=torch.float64)
    for c in range(K):  # pixel by class: p_t of the pixels whose label is c
        p_t = probs[:, c][valid & (lab == c)]
        total = total - (w[c] * (1 - p_t) ** gamma * torch.log(p_t)).sum()
    return total


def ref_dice(logits, labels, weight, gamma, eps=1.0):
    probs, lab = ref_probs(logits, labels)
    valid = lab != 255
    losses = []
    for c in range(K):
        y = (lab[valid] == c).double()
        if y.sum() == 0:
            continue
        p = probs[:, c][valid]
        losses.append(1 - (2 * (p * y).sum() + eps) / (p.sum() + y.sum() + eps))
    return torch.stack(losses).mean()


def ref_lovasz(logits, labels, weight, gamma):
    """The Lovasz extension by its definition: errors sorted in decreasing order, each weighted
    by the increase of the Jaccard loss |M| / |fg u M| when its pixel joins the set M."""
    probs, lab = ref_probs(logits, labels)
    valid = lab != 255
    losses = []
    for c in range(K):
        fg = lab[valid] == c
        if not fg.any():
            continue
        errors = (fg.double() - probs[:, c][valid]).abs()
        errors, order = torch.sort(errors, descending=True)
        fg_sorted = fg[order].tolist()
        n_fg, n_bg_in_m, previous, steps = sum(fg_sorted), 0, 0.0, []
        for i, is_fg in enumerate(fg_sorted, start=1):
            n_bg_in_m += not is_fg
            jaccard_loss = i / (n_fg + n_bg_in_m)
            steps.append(jaccard_loss - previous)
            previous = jaccard_loss
        losses.append(errors @ torch.tensor(steps, dtype=torch.float64))
    return torch.stack(losses).mean()


REFERENCES = {"ce": ref_ce, "focal": ref_focal, "dice": ref_dice, "lovasz": ref_lovasz}


def ref_weight_sum(labels, weight):
    lab = labels.long()[labels != 255]
    w = torch.ones(K) if weight is None else weight
    return w.double()[lab].sum()


def random_batch(grid, size, weighted, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(batch, K, *grid, generator=g, dtype=torch.float64)).float()
    labels = torch.randint(0, K, (batch, *size), generator=g)
    labels[labels == 4] = 3  # class 4 absent: set-level terms must skip it
    labels[0, : size[0] // 3] = 255
    labels[1, :, : size[1] // 4] = 255
    weight = torch.rand(K, generator=g) + 0.1 if weighted else None
    return logits, labels.to(torch.uint8), weight


def run(spec, logits, labels, weight):
    x = logits.clone().requires_grad_()
    parts = Criterion(spec, weight)(x, labels)
    parts.value().backward()
    return parts, x.grad


def run_reference(name, logits, labels, weight, gamma=2.0):
    x = logits.double().requires_grad_()
    value = REFERENCES[name](x, labels, weight, gamma)
    if LOSS_TERMS[name].per_pixel:
        value = value / ref_weight_sum(labels, weight)
    value.backward()
    return value, x.grad


def test_every_registered_term_has_a_reference():
    assert set(REFERENCES) == set(LOSS_TERMS)


@pytest.mark.parametrize("grid,size", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("name", list(LOSS_TERMS))
def test_each_term_equals_its_reference(name, grid, size, weighted):
    logits, labels, weight = random_batch(grid, size, weighted)
    parts, grad = run(LossSpec.parse(name), logits, labels, weight)
    ref_value, ref_grad = run_reference(name, logits, labels, weight)
    if LOSS_TERMS[name].per_pixel:
        ref_sum = REFERENCES[name](logits.double(), labels, weight, 2.0)
        torch.testing.assert_close(parts.pixel_sum.double(), ref_sum, **VALUE_TOL)
        assert parts.set_terms.item() == 0
    else:
        torch.testing.assert_close(parts.set_terms.double(), ref_value, **VALUE_TOL)
        assert parts.pixel_sum.item() == 0
    torch.testing.assert_close(parts.pixel_weight.double(), ref_weight_sum(labels, weight))
    torch.testing.assert_close(parts.value().double(), ref_value.detach(), **VALUE_TOL)
    torch.testing.assert_close(grad.double(), ref_grad, **GRAD_TOL)
    assert 0.1 < ref_value.item() < 10 and ref_grad.abs().max() > 1e-4  # a loss that can fail


@pytest.mark.parametrize("gamma", [0.5, 3.0])
def test_focal_gamma_equals_reference(gamma):
    logits, labels, weight = random_batch(*SHAPES[0], weighted=True, seed=3)
    parts, grad = run(LossSpec.parse("focal", focal_gamma=gamma), logits, labels, weight)
    ref_value, ref_grad = run_reference("focal", logits, labels, weight, gamma)
    torch.testing.assert_close(parts.value().double(), ref_value.detach(), **VALUE_TOL)
    torch.testing.assert_close(grad.double(), ref_grad, **GRAD_TOL)


def test_focal_with_gamma_0_is_cross_entropy():
    logits, labels, weight = random_batch(*SHAPES[1], weighted=True, seed=4)
    ce, ce_grad = run(LossSpec.parse("ce"), logits, labels, weight)
    focal, focal_grad = run(LossSpec.parse("focal", focal_gamma=0), logits, labels, weight)
    assert torch.equal(focal.pixel_weight, ce.pixel_weight)
    # the fused CE and autograd's log-softmax differ only in float32 rounding
    torch.testing.assert_close(focal.pixel_sum, ce.pixel_sum, rtol=1e-6, atol=0)
    torch.testing.assert_close(focal_grad, ce_grad, rtol=1e-5, atol=1e-8)


def test_focal_gradient_is_finite_where_the_prediction_is_certain():
    logits = torch.zeros(1, 3, 2, 2)
    logits[:, 0] = 200  # p_t rounds to 1 for class 0: d(1 - p_t)^0.5 would be infinite
    labels = torch.zeros(1, 5, 5, dtype=torch.uint8)
    parts, grad = run(LossSpec.parse("focal", focal_gamma=0.5), logits, labels, None)
    assert parts.value().item() == 0 and torch.all(grad == 0)


@pytest.mark.parametrize("weighted", [False, True])
def test_criterion_ce_is_exactly_loss_terms(weighted):
    logits, labels, weight = random_batch(*SHAPES[1], weighted)
    parts, grad = run(LossSpec.parse("ce"), logits, labels, weight)
    x = logits.clone().requires_grad_()
    total, count = loss_terms(x, labels, weight)
    (total / count).backward()
    assert torch.equal(parts.pixel_sum, total) and torch.equal(parts.pixel_weight, count)
    assert torch.equal(parts.value(), segmentation_loss(logits, labels, weight))
    assert torch.equal(grad, x.grad) and parts.set_terms.item() == 0


def test_combination_is_the_weighted_sum_of_its_terms():
    logits, labels, weight = random_batch(*SHAPES[1], weighted=True, seed=5)
    spec = LossSpec.parse("ce+0.5focal+0.25dice+2lovasz")
    parts, grad = run(spec, logits, labels, weight)
    alone = {name: run(LossSpec.parse(name), logits, labels, weight) for name, _ in spec.terms}
    weights = dict(spec.terms)
    pixel_sum = alone["ce"][0].pixel_sum + 0.5 * alone["focal"][0].pixel_sum
    set_terms = 0.25 * alone["dice"][0].set_terms + 2 * alone["lovasz"][0].set_terms
    torch.testing.assert_close(parts.pixel_sum, pixel_sum, rtol=1e-6, atol=0)
    torch.testing.assert_close(parts.set_terms, set_terms, rtol=1e-6, atol=0)
    assert torch.equal(parts.pixel_weight, alone["ce"][0].pixel_weight)
    summed_grad = sum(weights[name] * g for name, (_, g) in alone.items())
    torch.testing.assert_close(grad, summed_grad, rtol=1e-5, atol=1e-8)


def test_pixel_sums_add_up_over_batches():
    logits, labels, weight = random_batch(*SHAPES[0], weighted=True, seed=6)
    criterion = Criterion(LossSpec.parse("ce+focal"), weight)
    whole = criterion(logits, labels)
    halves = [criterion(logits[i : i + 1], labels[i : i + 1]) for i in range(2)]
    torch.testing.assert_close(whole.pixel_sum, halves[0].pixel_sum + halves[1].pixel_sum)
    torch.testing.assert_close(whole.pixel_weight, halves[0].pixel_weight + halves[1].pixel_weight)


@pytest.mark.parametrize("text", [*LOSS_TERMS, "ce+0.5focal+0.25dice+2lovasz"])
def test_all_ignored_batch_gives_zero_and_zero_gradients(text):
    logits = torch.randn(2, K, 3, 5)
    labels = torch.full((2, 10, 13), 255, dtype=torch.uint8)
    parts, grad = run(LossSpec.parse(text), logits, labels, torch.rand(K))
    assert parts.value().item() == 0 and parts.pixel_weight.item() == 0
    assert torch.all(grad == 0)


@pytest.mark.parametrize(
    "text,canonical",
    [
        ("ce", "ce"),
        ("ce+0.5dice", "ce+0.5dice"),
        ("focal+dice", "focal+dice"),
        ("0.5ce+0.5lovasz", "0.5ce+0.5lovasz"),
        ("ce+0.25lovasz+0.5dice", "ce+0.5dice+0.25lovasz"),
        (" 2 * Dice + 1.0ce ", "ce+2dice"),
        ("1e-3lovasz+.5focal", "0.5focal+0.001lovasz"),
        ("0.123456789dice", "0.123456789dice"),
        ("1e+20ce", "1e+20ce"),
    ],
)
def test_parse_round_trips_to_canonical_text(text, canonical):
    spec = LossSpec.parse(text)
    assert str(spec) == canonical
    assert LossSpec.parse(str(spec)) == spec
    assert [name for name, _ in spec.terms] == [n for n in LOSS_TERMS if n in dict(spec.terms)]


def test_parse_weights_and_focal_gamma():
    spec = LossSpec.parse("ce+0.25lovasz+0.5dice")
    assert spec.terms == (("ce", 1.0), ("dice", 0.5), ("lovasz", 0.25))
    focal = LossSpec.parse("focal+dice", focal_gamma=1.5)
    assert focal.focal_gamma == 1.5 and LossSpec.parse(str(focal), focal.focal_gamma) == focal
    assert LossSpec((("dice", 0.5), ("ce", 1))) == LossSpec.parse("ce+0.5dice")  # canonical
    # gamma is no part of a loss without focal: equal losses compare equal
    assert LossSpec.parse("ce", focal_gamma=3) == LossSpec.parse("ce")


@pytest.mark.parametrize(
    "text,problem",
    [
        ("", "cannot read a term"),
        ("   ", "cannot read a term"),
        ("ce+", "cannot read a term"),
        ("+ce", "cannot read a term"),
        ("ce++dice", "cannot read a term"),
        ("ce dice", "expected '+'"),
        ("bce", "unknown term 'bce'"),
        ("ce+0.5iou", "unknown term 'iou'"),
        ("-0.5ce", "cannot read a term"),
        ("ce+0dice", "weight of dice must be a positive number"),
        ("1e999ce", "weight of ce must be a positive number"),
        ("ce+dice+0.5ce", "ce appears more than once"),
    ],
)
def test_bad_loss_text_is_a_one_line_config_error(text, problem):
    with pytest.raises(ConfigError) as e:
        LossSpec.parse(text)
    message = str(e.value)
    assert problem in message and "\n" not in message
    assert "known terms: " + ", ".join(LOSS_TERMS) in message


@pytest.mark.parametrize("gamma", [-1.0, float("nan"), float("inf")])
def test_bad_focal_gamma_is_a_config_error(gamma):
    with pytest.raises(ConfigError, match="focal gamma"):
        LossSpec.parse("focal", focal_gamma=gamma)
