"""What makes features (and the heads trained on them) interchangeable: a digest of the
backbone's identity, the preprocessing and the class map. Caches store it; checkpoints carry it;
a head is used only on features with the same fingerprint."""

from __future__ import annotations

from offroad_seg.data.classes import ClassMap
from offroad_seg.data.digest import digest
from offroad_seg.models.backbone import BackboneSpec
from offroad_seg.models.preprocess import Preprocessing


def compat_fingerprint(
    backbone: BackboneSpec, preprocessing: Preprocessing, class_map: ClassMap
) -> str:
    """Equal for caches (and heads) whose features and labels mean the same thing."""
    return digest(
        {
            "backbone": backbone.identity(),
            "preprocessing": preprocessing.to_dict(),
            "class_map": class_map.to_dict(),
        }
    )


def compat_differences(
    a: tuple[BackboneSpec, Preprocessing, ClassMap],
    b: tuple[BackboneSpec, Preprocessing, ClassMap],
    sizes: bool = True,
) -> list[str]:
    """What stops features (or heads) described by (backbone, preprocessing, class map) `a`
    and `b` being used together, in words, `a`'s values first: empty when their
    `compat_fingerprint`s are equal. `sizes=False` leaves the working size out: a fully
    convolutional head trains on caches of several sizes (their tokens mean the same thing at
    other scales)."""
    (bb_a, prep_a, map_a), (bb_b, prep_b, map_b) = a, b
    out = []
    if bb_a.name != bb_b.name:
        out.append(f"backbone {bb_a.name} vs {bb_b.name}")
    elif bb_a.weights_sha256 != bb_b.weights_sha256:
        out.append(f"backbone weights {bb_a.weights_sha256[:12]} vs {bb_b.weights_sha256[:12]}")
    if bb_a.layers != bb_b.layers:
        out.append(f"layers {bb_a.layers} vs {bb_b.layers}")
    if bb_a.block != bb_b.block:
        out.append(f"cached block {bb_a.block} vs {bb_b.block}")
    if sizes and prep_a.size != prep_b.size:
        (r, c), (r2, c2) = prep_a.size, prep_b.size
        out.append(f"working size {r}x{c} vs {r2}x{c2}")
    rest_a, rest_b = prep_a.to_dict(), prep_b.to_dict()
    for name, mine in rest_a.items():  # the first other setting that differs
        if name != "size" and mine != rest_b.get(name):
            out.append(f"preprocessing {name} {_plain(mine)} vs {_plain(rest_b.get(name))}")
            break
    if map_a != map_b:
        out.append(f"class map: {map_a.difference(map_b)}")
    return out


def _plain(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)
