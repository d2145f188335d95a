"""Stage 1: the feature cache (its zarr format, creation, resume, verification, reading),
int8 quantisation of features, the decoding workers, and `extract`, which runs the frozen
backbone once per image and stores its features.

Layer: above `reporting`; used by `training` and `inference`, never the reverse.
"""
