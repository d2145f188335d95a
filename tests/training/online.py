"""Training online from the images (decode -> preprocess -> model every step, the sample order
and schedule of `train`), written independently of the cache: the reference that cached
training (tests/training/test_train.py) and tuning from a block cache (test_tuning.py) must
equal."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from offroad_seg.data.classes import ClassMap
from offroad_seg.data.dataset import list_samples
from offroad_seg.data.images import read_image, read_labels
from offroad_seg.models.preprocess import Preprocessing, image_to_tensor, preprocess, resize_labels
from offroad_seg.training.loop import lr_at, make_optimizer, warmup_steps
from offroad_seg.training.losses import class_weights_from_pixels, segmentation_loss
from offroad_seg.training.sources import epoch_order


def online_losses(
    data_dir: Path,
    size: tuple[int, int],
    model: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    seed: int,
    epochs: int = 2,
    batch_size: int = 2,
    lr: float = 3e-4,
    backbone_scale: float = 1.0,
) -> list[float]:
    """Each step's loss of training `model`'s trainable parameters with `forward` (normalised
    images (B, 3, rows, cols) -> logits) on a two-view (identity, flip) split, as `train` does
    with its defaults (AdamW 0.01, one warmup epoch, auto class weights, cross entropy)."""
    samples = list_samples(data_dir)
    prep, cm = Preprocessing(size=size), ClassMap.default()
    labels = [resize_labels(read_labels(s.mask, cm), size) for s in samples]
    counts = sum(np.bincount(lab.ravel(), minlength=256)[:11] for lab in labels)
    weight = torch.tensor(class_weights_from_pixels(counts), dtype=torch.float32)
    opt = make_optimizer(model, lr, 0.01, backbone_scale)
    n = len(samples)
    spe = math.ceil(n / batch_size)
    total = epochs * spe
    warm = warmup_steps(1.0, spe, total)
    losses, step = [], 0
    for epoch in range(1, epochs + 1):
        perm, views = epoch_order(torch.full((n,), 2), seed, epoch)
        for s in range(0, n, batch_size):
            xs, ys = [], []
            part = slice(s, s + batch_size)
            for i, v in zip(perm[part].tolist(), views[part].tolist(), strict=True):
                x = preprocess(image_to_tensor(read_image(samples[i].image)), prep)
                y = labels[i]
                if v == 1:
                    x, y = x.flip(-1), y[:, ::-1]
                xs.append(x)
                ys.append(torch.from_numpy(y.copy()))
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, warm, lr) * g["lr_scale"]
            loss = segmentation_loss(forward(torch.cat(xs)), torch.stack(ys), weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
    return losses
