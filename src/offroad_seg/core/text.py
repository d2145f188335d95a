"""Small helpers for messages people read."""

from __future__ import annotations


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """'1 image', '3 images', '0 images'."""
    return f"{n} {word(n, noun, nouns)}"


def word(n: int, noun: str, nouns: str | None = None) -> str:
    """The noun alone, as many things need: 'image' for 1, 'images' otherwise."""
    return noun if n == 1 else (nouns or noun + "s")


def listing(items: list[str] | tuple[str, ...]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = list(items)
    if len(items) < 2:
        return "".join(items)
    return f"{', '.join(items[:-1])} and {items[-1]}"


def they_are(n: int) -> str:
    """'it is' for one thing, 'they are' for several (a sentence about n files)."""
    return "it is" if n == 1 else "they are"


def differ(n: int) -> str:
    """The verb after n subjects: 'differs' for one, 'differ' for several."""
    return "differs" if n == 1 else "differ"
