"""What is deployed: the backbone registry (DINOv2 and DINOv3 families), weight files, the
frozen backbone and its one preprocessing path, the segmentation heads (one module each, a
registry), upsampling of logits, the fingerprint that says which features a head fits, head
checkpoints, and `SegmentationModel` (backbone + head + preprocessing + class map).

Layer: above `data`; imports no zarr and no optuna, so the deploy path (export, `Segmenter`) does
not need the cache or the sweep machinery.
"""
