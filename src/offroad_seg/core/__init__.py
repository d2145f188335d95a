"""Infrastructure with no domain knowledge: atomic writes and temporary-file hygiene, writer
locks, where caches are stored (local folders or fsspec URLs), the device and mixed precision,
torchrun ranks, a bounded thread pool, wording helpers.

Layer: the lowest but `errors`. May import `errors` only.
"""
