"""Stage 2: training heads on cached features: what a training reads (`inputs`, `sources`),
the losses, the epoch loop (`loop`, read top to bottom), validation, resume, the run folder and
its stats, keeping validation data out of training, and sweeps (`sweep/`).

Layer: beside `inference` (neither imports the other), above `features`.
"""
