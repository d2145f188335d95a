"""What people read: matplotlib figures (training curves, per-class metrics, confusion
matrix, sweeps), image panels and overlays, report thumbnails, the HTML report, and the `info`
and `compare` summaries of runs.

Layer: above `metrics`; writes files, decides nothing about training or inference.
"""
