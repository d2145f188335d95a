"""The training criterion: cross entropy of token logits upsampled to the label size.

Upsampling 11 x 19 x 34 logits to 266 x 476 and taking a softmax at every pixel costs as much
as the head itself, so it is fused: bilinear upsampling (align_corners=False, exactly as
`F.interpolate`) is a matrix product on each axis, `R_y @ logits @ R_x^T`, and the backward pass
reuses the forward's softmax instead of recomputing the upsampled logits. It gives the same
loss and gradients as interpolate + cross_entropy (to float rounding) in about half the time and
memory traffic on CPU.

Other losses combine with it as a weighted sum written `ce+0.5dice` (`LossSpec`, `Criterion`,
registry `LOSS_TERMS`), in two kinds that a data-parallel loop treats differently:
- per-pixel terms (`ce`, `focal`) are sums over pixels weighted by the class weights,
  normalised by the sum of those weights, so they add up over batches and ranks like CE;
- set-level terms (`dice`, `lovasz`) are one value per batch, computed over all its valid
  pixels at once (not per image) and averaged over the classes present in its labels (an
  absent class has no defined Dice/IoU to optimise); class weights do not apply to them.
`dice` is 1 - (2 sum p_c y_c + 1) / (sum p_c + sum y_c + 1) per class: eps = 1 keeps a batch
with no valid pixels at 0 instead of 0/0 and is negligible at 10^5-10^6 pixels per class.
`lovasz` is the Lovasz-softmax (Berman et al. 2018), the convex surrogate of 1 - IoU; it sorts
every valid pixel once per present class, which makes it the expensive term on CPU.

Class weights `auto` are median-frequency balancing: w_c = median(f) / f_c over the classes
with pixels (f_c = pixel frequency in the training caches), clipped to [0.1, 10]; classes
without pixels get 0 (they are never a target).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from offroad_seg.data.classes import IGNORE_ID
from offroad_seg.errors import ConfigError
from offroad_seg.models.upsampling import bilinear_matrix, upsample_bilinear

WEIGHT_CLIP = (0.1, 10.0)


def class_weights_from_pixels(pixels: np.ndarray) -> np.ndarray:
    """Median-frequency balancing, clipped; see the module docstring."""
    pixels = np.asarray(pixels, dtype=np.float64)
    weights = np.zeros_like(pixels)
    seen = pixels > 0
    if seen.any():
        freq = pixels[seen] / pixels[seen].sum()
        weights[seen] = np.clip(np.median(freq) / freq, *WEIGHT_CLIP)
    return weights


def parse_class_weights(spec: str, pixels: np.ndarray) -> np.ndarray | None:
    """`auto`, `none`, or K comma-separated numbers."""
    if spec == "auto":
        return class_weights_from_pixels(pixels)
    if spec == "none":
        return None
    try:
        values = np.array([float(v) for v in spec.split(",")], dtype=np.float64)
    except ValueError as e:
        raise ConfigError(f"class weights {spec!r}: expected auto, none or numbers") from e
    if len(values) != len(pixels):
        raise ConfigError(f"class weights: {len(values)} values for {len(pixels)} classes")
    return values


class _UpsampledCrossEntropy(torch.autograd.Function):
    """sum_p w_p * CE(upsample(logits)_p, target_p); see the module docstring."""

    @staticmethod
    def forward(ctx, logits, target, pixel_weight, ry, rx_t):
        z = torch.matmul(ry, torch.matmul(logits, rx_t))  # (B, K, H, W)
        z.sub_(z.amax(1, keepdim=True))
        z_target = z.gather(1, target[:, None])
        probs = z.exp_()
        norm = probs.sum(1, keepdim=True)
        nll = (norm.log() - z_target)[:, 0]
        probs.div_(norm)  # softmax, kept for the backward pass
        ctx.save_for_backward(probs, target, pixel_weight, ry, rx_t)
        return (nll * pixel_weight).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if getattr(ctx, "consumed", False):
            raise RuntimeError("the fused loss supports one backward pass (no retain_graph)")
        ctx.consumed = True
        probs, target, pixel_weight, ry, rx_t = ctx.saved_tensors
        g = probs  # turned into the gradient in place: saves a full-resolution copy
        g.scatter_add_(1, target[:, None], torch.full_like(g[:, :1], -1.0))
        g.mul_((pixel_weight * grad)[:, None])
        d_logits = torch.matmul(torch.matmul(ry.t(), g), rx_t.t())
        return d_logits, None, None, None, None


def _targets(
    labels: torch.Tensor, weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, H, W) labels -> (target with ignored pixels set to class 0, valid mask, per-pixel
    class weight that is 0 on ignored pixels)."""
    labels = labels.long()
    valid = labels != IGNORE_ID
    target = labels.masked_fill(~valid, 0)
    pixel_weight = valid.float() if weight is None else weight.float()[target] * valid
    return target, valid, pixel_weight


def _fused_cross_entropy_sum(
    logits: torch.Tensor, target: torch.Tensor, pixel_weight: torch.Tensor
) -> torch.Tensor:
    (h, w), (H, W) = logits.shape[-2:], target.shape[-2:]
    ry = bilinear_matrix(h, H, logits.device)
    rx_t = bilinear_matrix(w, W, logits.device).t()
    return _UpsampledCrossEntropy.apply(logits.float(), target, pixel_weight, ry, rx_t)


def loss_terms(
    logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross entropy of (B, K, h, w) logits upsampled (bilinear) to the (B, H, W) label size,
    ignoring 255. Returns (sum of weighted pixel losses, sum of their weights): the ratio is the
    mean, and sums add up exactly across batches."""
    target, _, pixel_weight = _targets(labels, weight)
    return _fused_cross_entropy_sum(logits, target, pixel_weight), pixel_weight.sum()


def segmentation_loss(
    logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None
) -> torch.Tensor:
    """Mean weighted cross entropy over the non-ignored pixels (as F.cross_entropy's mean)."""
    total, count = loss_terms(logits, labels, weight)
    return total / count.clamp_min(1e-12)


# ----------------------------------------------------------------------------- combinable losses


class _Batch:
    """One batch's targets and the full-resolution quantities its loss terms share, each made
    on first use (cached properties), so a spec pays only for what its terms need."""

    def __init__(self, logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None):
        self.logits = logits
        self.target, self.valid, self.pixel_weight = _targets(labels, weight)

    def _upsampled(self) -> torch.Tensor:
        return upsample_bilinear(self.logits, tuple(self.target.shape[-2:]))

    def at_target(self, values: torch.Tensor) -> torch.Tensor:
        """(B, K, H, W) -> (B, H, W): each pixel's value for its target class."""
        return values.gather(1, self.target[:, None])[:, 0]

    @functools.cached_property
    def log_probs(self) -> torch.Tensor:
        """(B, K, H, W) log-softmax of the upsampled logits."""
        return torch.log_softmax(self._upsampled(), 1)

    @functools.cached_property
    def log_probs_at_target(self) -> torch.Tensor:
        """(B, H, W) log p_t; 0 on ignored pixels."""
        return self.at_target(self.log_probs)

    @functools.cached_property
    def probs(self) -> torch.Tensor:
        """(B, K, H, W) softmax of the upsampled logits (from the log-softmax when a term has
        already made it, so the upsampling runs once)."""
        if "log_probs" in self.__dict__:
            return self.log_probs.exp()
        return torch.softmax(self._upsampled(), 1)

    @functools.cached_property
    def label_counts(self) -> torch.Tensor:
        """(K,) float: each class's number of valid pixels in the batch."""
        valid = self.valid.flatten().float()
        return torch.bincount(self.target.flatten(), valid, minlength=self.logits.shape[1])

    @property
    def present(self) -> torch.Tensor:
        """(K,) bool: the classes with at least one valid pixel in the batch."""
        return self.label_counts > 0


def _ce_sum(batch: _Batch, spec: LossSpec) -> torch.Tensor:
    """sum_p w_c (-log p_t). Alone: the fused function, so exactly `loss_terms`. With other
    terms, which make the full-resolution softmax anyway: from it (less time than both)."""
    if len(spec.terms) == 1:
        return _fused_cross_entropy_sum(batch.logits, batch.target, batch.pixel_weight)
    return -(batch.pixel_weight * batch.log_probs_at_target).sum()


def _focal_sum(batch: _Batch, spec: LossSpec) -> torch.Tensor:
    """sum_p w_c (1 - p_t)^gamma (-log p_t); with gamma 0 it is the weighted cross entropy."""
    log_pt = batch.log_probs_at_target
    # 1 - p_t via expm1 stays accurate near p_t = 1; the floor keeps d/dp_t of (1 - p_t)^gamma
    # finite for gamma < 1 where p_t rounds to 1 (its weight there is -log p_t = 0 anyway)
    modulator = (-torch.expm1(log_pt)).clamp_min(torch.finfo(log_pt.dtype).tiny)
    return -(batch.pixel_weight * modulator.pow(spec.focal_gamma) * log_pt).sum()


DICE_EPS = 1.0


def _dice_mean(batch: _Batch, spec: LossSpec) -> torch.Tensor:
    """Soft Dice over the whole batch, averaged over the classes present in its ground truth."""
    probs, valid = batch.probs, batch.valid.float()
    k = probs.shape[1]
    # per-class sums without a one-hot or a masked copy of the probabilities
    prob_sum = torch.einsum("bkhw,bhw->k", probs, valid)
    p_t = batch.at_target(probs) * valid
    inter = p_t.new_zeros(k).index_add_(0, batch.target.flatten(), p_t.flatten())
    dice = 1 - (2 * inter + DICE_EPS) / (prob_sum + batch.label_counts + DICE_EPS)
    present = batch.present.float()
    return (dice * present).sum() / present.sum().clamp_min(1)


class _LovaszSoftmax(torch.autograd.Function):
    """Lovasz-softmax of (B, K, H, W) probabilities over the valid pixels of the whole batch,
    averaged over `classes` (Berman et al. 2018, "present" classes, not per image).

    For class c the errors are e = 1 - p_c on its pixels and p_c elsewhere; sorted in decreasing
    order, the Lovasz extension of the Jaccard loss is sum_i e_(i) (J_i - J_(i-1)), J_i the
    Jaccard loss of the set of the i largest errors. It is linear in the errors between changes
    of their order, so the backward pass only needs each pixel's slope J_i - J_(i-1): the
    forward pass keeps those (one float per valid pixel and class) instead of autograd keeping
    the sort, and the loop over classes never makes more than one full-size tensor."""

    @staticmethod
    def forward(ctx, probs, target, valid, classes):
        _, k, h, w = probs.shape
        pixels = valid.flatten().nonzero()[:, 0]  # valid pixels, flat indices into (B, H, W)
        labels = target.flatten()[pixels]
        # flat index into (B, K, H, W) of each valid pixel's class 0 (class c: + c * h * w)
        at = pixels // (h * w) * (k * h * w) + pixels % (h * w)
        flat = probs.flatten()
        # rank i from 1, in float64: J's steps are O(1 / pixels) differences of O(1) numbers,
        # far below float32's resolution at a training batch's million pixels
        rank = torch.arange(1, len(pixels) + 1, dtype=torch.float64, device=probs.device)
        slopes = probs.new_empty(len(classes), len(pixels))
        total = torch.zeros((), dtype=torch.float64, device=probs.device)
        for i, c in enumerate(classes):
            fg = labels == c
            p = flat[at + c * h * w]
            errors, order = torch.where(fg, 1 - p, p).sort(descending=True)
            fg_in_prefix = fg[order].cumsum(0, dtype=torch.float64)
            fg_outside = fg_in_prefix[-1] - fg_in_prefix  # |fg \ prefix|
            # 1 - J_i = |fg \ prefix| / |fg u prefix|; J_0 = 0
            kept = fg_outside / (fg_outside + rank)
            step = -torch.diff(kept, prepend=kept.new_ones(1))
            total += errors.double() @ step
            slopes[i].scatter_(0, order, step.float())
        ctx.save_for_backward(slopes, at, labels)
        ctx.classes, ctx.shape = classes, probs.shape
        return (total / max(len(classes), 1)).float()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        slopes, at, labels = ctx.saved_tensors
        _, _, h, w = ctx.shape
        d_probs = torch.zeros(ctx.shape, dtype=slopes.dtype, device=slopes.device)
        flat = d_probs.view(-1)
        scale = grad / max(len(ctx.classes), 1)
        for i, c in enumerate(ctx.classes):
            # de/dp is -1 on the class's own pixels (e = 1 - p), +1 elsewhere
            flat[at + c * h * w] = torch.where(labels == c, -slopes[i], slopes[i]) * scale
        return d_probs, None, None, None


def _lovasz_mean(batch: _Batch, spec: LossSpec) -> torch.Tensor:
    """Lovasz-softmax over the whole batch, averaged over the classes present in it."""
    classes = batch.present.nonzero().flatten().tolist()
    return _LovaszSoftmax.apply(batch.probs, batch.target, batch.valid, classes)


@dataclass(frozen=True)
class LossTerm:
    """One loss in the registry. A per-pixel term returns its sum over pixels (weighted by the
    class weights; normalised by the pixel weight by the caller, which lets sums add up over
    batches and ranks); a set-level term returns its value for the batch (a mean)."""

    compute: Callable[[_Batch, LossSpec], torch.Tensor]
    per_pixel: bool
    summary: str


# the canonical order of terms in a spec is this order
LOSS_TERMS: dict[str, LossTerm] = {
    "ce": LossTerm(_ce_sum, True, "cross entropy, class-weighted"),
    "focal": LossTerm(_focal_sum, True, "focal loss (Lin et al.), class weights as alpha"),
    "dice": LossTerm(_dice_mean, False, "soft Dice over the batch, mean over present classes"),
    "lovasz": LossTerm(_lovasz_mean, False, "Lovasz-softmax (Berman et al.), mIoU surrogate"),
}

_TERM_RE = re.compile(
    r"\s*(?P<weight>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)?\s*\*?\s*(?P<name>[A-Za-z_]\w*)\s*"
)


def _format_weight(weight: float) -> str:
    short = f"{weight:g}"
    return short if float(short) == weight else repr(weight)


@dataclass(frozen=True)
class LossSpec:
    """A weighted sum of registered loss terms, e.g. `ce+0.5dice` (see `parse`).

    `focal_gamma` is kept only when focal is a term (the default otherwise), so specs of the
    same loss compare equal; `str` gives the terms, so `parse(str(s), s.focal_gamma) == s`."""

    terms: tuple[tuple[str, float], ...]
    focal_gamma: float = 2.0

    def __post_init__(self) -> None:
        problem = _terms_problem(self.terms)
        if problem:
            _spec_error("+".join(f"{w}{n}" for n, w in self.terms), problem)
        gamma = float(self.focal_gamma)
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ConfigError(f"focal gamma {self.focal_gamma}: expected a number >= 0")
        rank = {name: i for i, name in enumerate(LOSS_TERMS)}
        terms = tuple(sorted(((n, float(w)) for n, w in self.terms), key=lambda t: rank[t[0]]))
        object.__setattr__(self, "terms", terms)
        focal = any(name == "focal" for name, _ in terms)
        object.__setattr__(self, "focal_gamma", gamma if focal else 2.0)

    @classmethod
    def parse(cls, text: str, focal_gamma: float = 2.0) -> LossSpec:
        """`TERM` or `TERM+TERM...`, each an optional positive weight (default 1, an optional
        `*` after it) and a registered name: `ce`, `ce+0.5dice`, `0.5ce+0.5lovasz`."""
        terms, pos = [], 0
        while True:
            m = _TERM_RE.match(text, pos)
            if m is None:
                problem = f"cannot read a term at {text[pos:]!r} (a positive weight, a name)"
                _spec_error(text, problem)
            weight = float(m["weight"]) if m["weight"] else 1.0
            terms.append((m["name"].lower(), weight))
            pos = m.end()
            if pos == len(text):
                break
            if text[pos] != "+":
                _spec_error(text, f"expected '+' at {text[pos:]!r}")
            pos += 1
        problem = _terms_problem(terms)
        if problem:
            _spec_error(text, problem)
        return cls(tuple(terms), focal_gamma)

    def __str__(self) -> str:
        return "+".join(("" if w == 1 else _format_weight(w)) + name for name, w in self.terms)


def _terms_problem(terms: Sequence[tuple[str, float]]) -> str | None:
    if not terms:
        return "no terms"
    names = [name for name, _ in terms]
    for name, weight in terms:
        if name not in LOSS_TERMS:
            return f"unknown term {name!r}"
        if not (math.isfinite(weight) and weight > 0):
            return f"weight of {name} must be a positive number, got {weight}"
        if names.count(name) > 1:
            return f"{name} appears more than once"
    return None


def _spec_error(text: str, problem: str) -> NoReturn:
    known = ", ".join(LOSS_TERMS)
    raise ConfigError(
        f"loss {text!r}: {problem}; expected terms like ce+0.5dice, known terms: {known}"
    )


@dataclass
class LossParts:
    """A criterion's value in parts that a data-parallel loop can combine: per-pixel terms as
    a sum and its normaliser (reduce both over ranks), set-level terms already averaged."""

    pixel_sum: torch.Tensor  # sum over pixels of the weighted per-pixel terms (ce, focal)
    pixel_weight: torch.Tensor  # sum of the pixel weights (the normaliser of pixel_sum)
    set_terms: torch.Tensor  # weighted sum of the set-level terms (dice, lovasz); 0 when none

    def value(self) -> torch.Tensor:
        """The loss of this batch on its own."""
        return self.pixel_sum / self.pixel_weight.clamp_min(1e-12) + self.set_terms


class Criterion:
    """The training loss of a `LossSpec`: (B, K, h, w) token logits and (B, H, W) labels (255
    ignored) -> `LossParts`. The terms work on the logits upsampled bilinearly
    (`upsample_bilinear`) to the label size; the spec `ce` runs the fused function of
    `loss_terms` and gives exactly its numbers at its cost. Call it outside autocast, like
    `loss_terms`."""

    def __init__(self, spec: LossSpec, class_weight: torch.Tensor | None):
        self.spec = spec
        self.class_weight = class_weight

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> LossParts:
        batch = _Batch(logits, labels, self.class_weight)
        pixel_sum: torch.Tensor | None = None
        set_terms: torch.Tensor | None = None
        for name, weight in self.spec.terms:
            term = LOSS_TERMS[name]
            value = term.compute(batch, self.spec)
            value = value if weight == 1 else weight * value
            if term.per_pixel:
                pixel_sum = value if pixel_sum is None else pixel_sum + value
            else:
                set_terms = value if set_terms is None else set_terms + value
        zero = batch.pixel_weight.new_zeros(())
        return LossParts(
            pixel_sum if pixel_sum is not None else zero,
            batch.pixel_weight.sum(),
            set_terms if set_terms is not None else zero,
        )
