"""offroad-seg: off-road scene segmentation on a frozen DINOv2 ViT-S/14 with a feature cache."""

__version__ = "0.1.0"
