"""A feature cache whose tokens carry semantics: a stand-in for real DINOv2 features.

    python bench/semantic_proxy.py SOURCE.zarr DEST.zarr [--difficulty 0.5] [--seed 0]

An untrained backbone's tokens describe colour and texture, not classes, so a head study on
them rewards heads that build semantics themselves (heavy decoders). A frozen, trained ViT
hands the head tokens that already say "mostly tree, some sky"; what a head adds is detail
below the 14 px patch and some context. This module writes such tokens from the label maps:

  token(i, j) = (1 - a) * t + a * mean of t over the 3x3 neighbourhood   (attention leaks)
  t = sum_k A_k(i, j) * (P_k + V_k(image) + L_k . offset_k(i, j))
      + S(image) + pos(i, j) + smooth(i, j) + noise

  A_k       the fraction of the patch's pixels of class k (area-weighted mix; label 255 is a
            "void" prototype of its own)
  P_k       the class prototype (fixed by --seed, the same for every image: the "backbone");
            classes that look alike (trees/lush bushes, dry grass/ground clutter/landscape,
            dry bushes/logs) share a component, so they are confusable
  V_k       within-class variation: per image and class, in a low-rank appearance subspace
  L_k . offset_k  where in the patch class k sits (its centroid's offset from the patch
            centre, projected on two class-specific directions): the little sub-patch layout
            a ViT's linear patch embedding keeps, so a learned upsampler has something to read
  S         a per-image nuisance (illumination/style) shared by every token
  pos       a fixed smooth function of the token position (positional leakage)
  smooth    a spatially smooth random field in a low-rank nuisance subspace (texture, shading)
  noise     i.i.d. Gaussian

`--difficulty` d in [0, 1] scales the prototypes' shared components, the within-class
variation, the nuisances, the leak between neighbours and the noise together. The cache is an
ordinary one (FeatureCache API, float16): the labels, hackathon labels, names and views are
copied from SOURCE (a cache `extract` made from the same scenes, whose labels come from the
masks at the working size), only the features and the backbone's identity differ, so `train`
reads it like a real cache and the two caches of a split differ only in their features.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from offroad_seg.features.cache import FeatureCache
from offroad_seg.models.backbone import BackboneSpec

PATCH = 14
VOID = 255
# groups of confusable classes of ClassMap.default() (ids): they share a prototype component
CONFUSABLE = ((1, 2), (3, 5, 9), (4, 7))


def _prototypes(rng: np.random.Generator, k: int, c: int, shared: float) -> np.ndarray:
    """(k + 1, c) unit-variance class prototypes (the last is void). Every class shares a
    quarter of `shared` of its variance with a common component (one domain), and the classes
    of a CONFUSABLE group share all of `shared` (the rest with their group's component)."""
    own = rng.standard_normal((k + 1, c))
    common = rng.standard_normal(c)
    base = 0.25 * shared
    p = np.sqrt(1 - base) * own + np.sqrt(base) * common
    for members in CONFUSABLE:
        g = rng.standard_normal(c)
        for m in (m for m in members if m < k):
            p[m] = (
                np.sqrt(1 - shared) * own[m] + np.sqrt(shared - base) * g + np.sqrt(base) * common
            )
    return p / p.std(axis=1, keepdims=True)


def _smooth_field(rng: np.random.Generator, rank: int, grid: tuple[int, int]) -> np.ndarray:
    """(rank, h, w) random fields, smooth over ~4 tokens (bilinear upsampling of a coarse one)."""
    import torch
    import torch.nn.functional as F

    h, w = grid
    coarse = torch.from_numpy(rng.standard_normal((1, rank, max(2, h // 4), max(2, w // 4))))
    return F.interpolate(coarse, size=grid, mode="bilinear", align_corners=False)[0].numpy()


class SemanticProxy:
    """Token features from label maps (see the module docstring); one instance is one
    "backbone": its prototypes and nuisance directions are fixed by `seed`."""

    def __init__(self, num_classes: int, channels: int, difficulty: float = 0.5, seed: int = 0):
        if not 0 <= difficulty <= 1:
            raise ValueError(f"difficulty {difficulty}: must be in [0, 1]")
        d = difficulty
        self.k, self.c, self.difficulty, self.seed = num_classes, channels, d, seed
        rng = np.random.default_rng([seed, 0x5E3A])
        self.protos = _prototypes(rng, num_classes, channels, shared=0.2 + 0.6 * d)
        self.appearance = rng.standard_normal((16, channels)) / 4  # within-class subspace
        self.layout = rng.standard_normal((num_classes + 1, 2, channels)) / np.sqrt(2)
        self.nuisance = rng.standard_normal((8, channels)) / np.sqrt(8)
        self.pos_dirs = rng.standard_normal((8, channels)) / np.sqrt(8)
        self.within = 0.3 + 0.9 * d  # std of a class's per-image variation
        self.layout_gain = 0.6 * (1 - 0.5 * d)
        self.style = 0.5 + 1.5 * d  # per-image shared nuisance
        self.field = 0.3 + 0.9 * d  # smooth nuisance field
        self.leak = 0.15 + 0.3 * d
        self.noise = 0.3 + 0.9 * d

    def describe(self) -> dict:
        return {"proxy": "semantic", "difficulty": self.difficulty, "seed": self.seed,
                "channels": self.c, "classes": self.k, "version": 1}  # fmt: skip

    def tokens(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(c, h, w) float32 features of one (H, W) label map of H, W multiples of 14."""
        k, c = self.k, self.c
        rows, cols = labels.shape
        h, w = rows // PATCH, cols // PATCH
        lab = np.where(labels == VOID, k, labels).astype(np.int64)
        onehot = np.zeros((k + 1, rows, cols), np.float32)
        np.put_along_axis(onehot, lab[None], 1.0, axis=0)
        blocks = onehot.reshape(k + 1, h, PATCH, w, PATCH)
        area = blocks.mean(axis=(2, 4))  # (k+1, h, w)
        offs = (np.arange(PATCH) - (PATCH - 1) / 2) / PATCH  # -0.46 .. 0.46
        # class centroid offsets within the patch, times the area (0 where a class is absent)
        dy = (blocks.sum(axis=4) * offs[:, None]).sum(axis=2) / PATCH**2
        dx = (blocks.sum(axis=2) * offs).sum(axis=3) / PATCH**2
        variation = rng.standard_normal((k + 1, 16)) @ self.appearance * self.within
        own = self.protos + variation  # (k+1, c)
        t = np.einsum("khw,kc->chw", area, own)
        layout = np.einsum("khw,kc->chw", dy, self.layout[:, 0]) + np.einsum(
            "khw,kc->chw", dx, self.layout[:, 1]
        )
        t += self.layout_gain * 4 * layout  # offsets are ~0.25 at most: x4 to unit scale
        t += self.style * (rng.standard_normal(8) @ self.nuisance)[:, None, None]
        yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
        basis = np.stack(
            [np.sin(np.pi * f * g) for f in (1, 2) for g in (yy, xx, yy + xx, yy - xx)]
        )
        t += 0.5 * np.einsum("bhw,bc->chw", basis, self.pos_dirs)
        t += self.field * np.einsum("rhw,rc->chw", _smooth_field(rng, 8, (h, w)), self.nuisance)
        t += self.noise * rng.standard_normal((c, h, w))
        padded = np.pad(t, ((0, 0), (1, 1), (1, 1)), mode="edge")
        neighbours = sum(padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9
        return ((1 - self.leak) * t + self.leak * neighbours).astype(np.float32)


def write_semantic_cache(
    source: Path, dest: Path, difficulty: float = 0.5, seed: int = 0, overwrite: bool = True
) -> Path:
    """DEST: SOURCE's labels, names and views with semantic-proxy features (module docstring).
    Images are drawn with their own random streams (by index), so DEST is deterministic."""
    src = FeatureCache.open(source)
    src.require_complete()
    spec = src.spec
    if spec.backbone.layers != 1:
        raise ValueError("the semantic proxy writes 1-layer caches")
    proxy = SemanticProxy(spec.class_map.num_classes, src.channels, difficulty, seed)
    sha = hashlib.sha256(json.dumps(proxy.describe(), sort_keys=True).encode()).hexdigest()
    backbone = BackboneSpec(sha, f"semantic-proxy d={difficulty:g}", 1, spec.backbone.name)
    out = FeatureCache.create(dest, replace(spec, backbone=backbone, dtype="float16"), overwrite)
    hackathon = src.hackathon_labels() if out.has_hackathon_labels else None
    chunks = list(range(out.num_chunks))
    for chunk in chunks:
        start, stop = out.chunk_range(chunk)
        _, labels = src.read_images(np.arange(start, stop))  # (n, V, H, W)
        feats = np.stack(
            [
                np.stack(
                    [
                        proxy.tokens(labels[i, v], np.random.default_rng([seed, start + i, v]))
                        for v in range(labels.shape[1])
                    ]
                )
                for i in range(len(labels))
            ]
        )
        out.write_chunk_data(
            chunk, feats.astype(np.float16), labels, None,
            None if hackathon is None else hackathon[start:stop],
        )  # fmt: skip
    out.commit_chunks(chunks)
    out.finalize()
    return dest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("source", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--difficulty", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    write_semantic_cache(args.source, args.dest, args.difficulty, args.seed)
    print(f"wrote {args.dest}")


if __name__ == "__main__":
    main()
