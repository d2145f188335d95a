"""Small helpers for messages people read."""

from __future__ import annotations


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """'1 image', '3 images', '0 images'."""
    return f"{n} {noun if n == 1 else (nouns or noun + 's')}"
