"""What the inputs are: the class map (raw 16-bit codes <-> class ids, names, colours), the
dataset layout (Color_Images/ + Segmentation/), predict's input discovery (files, folders,
globs, videos), image and mask decoding, video frames, and the synthetic scenes of the demo.

Layer: above `config` and `core`; knows nothing of backbones, caches or training.
"""
