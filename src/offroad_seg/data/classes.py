"""The class map: which raw mask code is which class, its id (0..K-1, table order), name and
colour; 255 is the ignore id. Class maps come built in by name (`default`, `hackathon`) or
from a JSON file (`resolve_class_map`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image

from offroad_seg.errors import DataError

IGNORE_ID = 255


@dataclass(frozen=True)
class ClassInfo:
    """One class: its raw code in the masks, its name and its display colour (RGB)."""

    code: int
    name: str
    color: tuple[int, int, int]


_DEFAULT_CLASSES = (
    ClassInfo(0, "Background", (0, 0, 0)),
    ClassInfo(100, "Trees", (34, 139, 34)),
    ClassInfo(200, "Lush Bushes", (0, 255, 0)),
    ClassInfo(300, "Dry Grass", (210, 180, 140)),
    ClassInfo(500, "Dry Bushes", (184, 134, 11)),
    ClassInfo(550, "Ground Clutter", (100, 100, 180)),
    ClassInfo(600, "Flowers", (255, 105, 180)),
    ClassInfo(700, "Logs", (255, 128, 0)),
    ClassInfo(800, "Rocks", (128, 128, 128)),
    ClassInfo(7100, "Landscape", (160, 82, 45)),
    ClassInfo(10000, "Sky", (135, 206, 235)),
)


# The hackathon's starter code: 10 classes, Flowers (600) and any other code become Background.
_HACKATHON_CLASSES = tuple(c for c in _DEFAULT_CLASSES if c.name != "Flowers")


def _rgb(color: tuple[int, int, int]) -> str:
    return "#" + "".join(f"{v:02x}" for v in color)


@dataclass(frozen=True)
class ClassMap:
    """Raw mask codes <-> class ids (0..K-1 in table order), names and colours.

    Codes not in the table are an error (or ignore, if asked), unless `fallback_id` is set:
    then they are that class (the hackathon map's Background)."""

    classes: tuple[ClassInfo, ...]
    fallback_id: int | None = None

    def __post_init__(self) -> None:
        if not self.classes:
            raise DataError("class map: no classes")
        if len(self.classes) >= IGNORE_ID:
            raise DataError(f"class map: {len(self.classes)} classes; at most {IGNORE_ID - 1}")
        codes = [c.code for c in self.classes]
        if len(set(codes)) != len(codes):
            raise DataError(f"class map: duplicate codes in {codes}")
        for c in self.classes:
            if not 0 <= c.code <= 65535:
                raise DataError(f"class map: code {c.code} of {c.name!r} is not in 0..65535")
        fallback = self.fallback_id
        if fallback is not None and (
            isinstance(fallback, bool)
            or not isinstance(fallback, int)
            or not 0 <= fallback < len(self.classes)
        ):
            raise DataError(
                f"class map: fallback_id {fallback!r} is not a class id 0..{len(self.classes) - 1}"
            )

    def difference(self, other: ClassMap) -> str:
        """How two class maps differ, in words, this one's values first ("" when equal): the
        number of classes, then the first class that differs, then the fallback."""
        if len(self.classes) != len(other.classes):
            return f"{len(self.classes)} classes vs {len(other.classes)}"
        for i, (a, b) in enumerate(zip(self.classes, other.classes, strict=True)):
            if a.name != b.name:
                return f"class {i} is {a.name} vs {b.name}"
            if a.code != b.code:
                return f"{a.name}'s mask code {a.code} vs {b.code}"
            if a.color != b.color:
                return f"{a.name}'s colour {_rgb(a.color)} vs {_rgb(b.color)}"
        if self.fallback_id != other.fallback_id:
            return f"unknown codes are {self._fallback_text()} vs {other._fallback_text()}"
        return ""

    def _fallback_text(self) -> str:
        if self.fallback_id is None:
            return "an error"
        return self.classes[self.fallback_id].name

    @classmethod
    def default(cls) -> ClassMap:
        return cls(_DEFAULT_CLASSES)

    @classmethod
    def hackathon(cls) -> ClassMap:
        """The hackathon starter's 10 classes; every other code (Flowers too) is Background."""
        return cls(_HACKATHON_CLASSES, fallback_id=0)

    @classmethod
    def from_dict(cls, data: Sequence[dict[str, Any]] | Mapping[str, Any]) -> ClassMap:
        """The inverse of `to_dict`: a list of {code, name, color} entries, or
        {"classes": [...], "fallback_id": id} for a map with a fallback."""
        fallback = None
        if isinstance(data, Mapping):
            if not isinstance(data.get("classes"), list):
                raise DataError('class map: expected {"classes": [...], "fallback_id": id}')
            fallback = data.get("fallback_id")
            data = data["classes"]
        try:
            classes = tuple(
                ClassInfo(int(d["code"]), str(d["name"]), tuple(int(v) for v in d["color"]))
                for d in data
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"class map: each entry needs code, name and color ({e})") from e
        return cls(classes, fallback_id=fallback)

    @classmethod
    def from_json(cls, path: str | Path) -> ClassMap:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: cannot read class map JSON ({e})") from e
        if not isinstance(data, (list, dict)):
            raise DataError(f"{path}: expected a list of {{code, name, color}} entries")
        try:
            return cls.from_dict(data)
        except DataError as e:
            raise DataError(f"{path}: {e}") from e

    def to_dict(self) -> list[dict[str, Any]] | dict[str, Any]:
        """JSON-ready. A map without a fallback is the plain list of entries, exactly as before
        fallbacks existed: it is hashed into the fingerprints of existing caches and heads."""
        classes = [{"code": c.code, "name": c.name, "color": list(c.color)} for c in self.classes]
        if self.fallback_id is None:
            return classes
        return {"classes": classes, "fallback_id": self.fallback_id}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def codes(self) -> np.ndarray:
        return np.array([c.code for c in self.classes], dtype=np.uint16)

    @property
    def palette(self) -> np.ndarray:
        """(K, 3) uint8 colours, indexed by class id."""
        return np.array([c.color for c in self.classes], dtype=np.uint8)

    def lookup_table(self) -> np.ndarray:
        """A 65536-entry table raw code -> id; unknown codes map to the fallback id if the map
        has one, else to 255 (ignore)."""
        unknown = IGNORE_ID if self.fallback_id is None else self.fallback_id
        lut = np.full(65536, unknown, dtype=np.uint8)
        lut[self.codes] = np.arange(self.num_classes, dtype=np.uint8)
        return lut

    def codes_to_ids(
        self, codes: np.ndarray, source: str = "mask", ignore_unknown: bool = False
    ) -> np.ndarray:
        """Map raw codes to ids. Unknown codes are the fallback id if the map has one; else an
        error naming `source`, or 255 if asked."""
        if codes.size and (int(codes.min()) < 0 or int(codes.max()) > 65535):
            raise DataError(f"{source}: mask values outside 0..65535")
        ids = self.lookup_table()[codes.astype(np.int64, copy=False)]
        if not ignore_unknown and self.fallback_id is None:
            unknown = np.unique(codes[ids == IGNORE_ID])
            if unknown.size:
                shown = ", ".join(str(int(c)) for c in unknown[:10])
                raise DataError(
                    f"{source}: unknown class codes {shown} (known: "
                    f"{', '.join(str(int(c)) for c in self.codes)}); "
                    "pass --ignore-unknown-codes to treat them as ignore"
                )
        return ids

    def ids_to_codes(self, ids: np.ndarray) -> np.ndarray:
        """Map ids back to raw codes (uint16); the ignore id maps to 0."""
        table = np.zeros(256, dtype=np.uint16)
        table[: self.num_classes] = self.codes
        return table[ids]

    def color_image(self, ids: np.ndarray) -> Image.Image:
        """(H, W) uint8 ids -> a paletted PIL image in the class colours; ignore is white."""
        table = np.full((256, 3), 255, dtype=np.uint8)
        table[: self.num_classes] = self.palette
        img = Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint8), mode="P")
        img.putpalette(table.ravel().tolist())
        return img

    def colorize(self, ids: np.ndarray) -> np.ndarray:
        """(H, W) ids -> (H, W, 3) uint8 colours; ignore is white. (PIL's palette expansion:
        ~15x faster than a numpy table lookup at 960x540.)"""
        return np.asarray(self.color_image(ids).convert("RGB"))


BUILTIN_CLASS_MAPS: Mapping[str, ClassMap] = MappingProxyType(
    {"default": ClassMap.default(), "hackathon": ClassMap.hackathon()}
)


def resolve_class_map(spec: str | Path | None) -> ClassMap:
    """A class map by built-in name (`default`, `hackathon`) or JSON file; None is `default`.
    A built-in name wins over a file of that name in the working folder (`./default` is the
    file), so a command line means the same wherever it runs."""
    if spec is None:
        return ClassMap.default()
    if isinstance(spec, str) and spec in BUILTIN_CLASS_MAPS:
        return BUILTIN_CLASS_MAPS[spec]
    path = Path(spec)
    if path.is_file():
        return ClassMap.from_json(path)
    raise DataError(
        f"class map {str(spec)!r}: no such file and not a built-in class map "
        f"(built-in: {', '.join(BUILTIN_CLASS_MAPS)})"
    )
