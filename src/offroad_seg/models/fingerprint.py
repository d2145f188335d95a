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
