"""Where each image's per-image outputs go inside an output folder (`masks/`, `overlays/`,
...): flat (`x.png`) for up to `config.OUTPUTS_PER_FOLDER` images; beyond that nested, so that
no folder holds more than that many files:

- inputs from several folders: by the input's folder, relative to the folders' common parent
  (`drives/a/x.jpg`, `drives/b/x.jpg` -> `a/x.png`, `b/x.png`; a dataset folder's
  `Color_Images/` is left out of the name);
- then, within one folder of more images than that: in numbered folders of that many, in
  input order (`0000/x.png` ... `0099/x.png`).

The names depend only on the list of inputs (sorted as they are read), which a resumed run
shares with the run it resumes, so they are the same on every rerun.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from offroad_seg import config
from offroad_seg.data.dataset import IMAGES_DIR, output_name


@dataclass(frozen=True)
class OutputLayout:
    """Each input image's per-image output name ('/'-separated, relative to an output folder
    such as `masks/`) and the subfolders they need, parents first."""

    names: list[str]
    folders: list[str]

    @property
    def nested(self) -> bool:
        return bool(self.folders)

    def key(self, index: int, image: Path) -> str:
        """The image's record key: its file name, under its output's subfolder when nested
        (two inputs of one name in two folders are two images)."""
        parent = PurePosixPath(self.names[index]).parent
        return str(parent / image.name) if self.nested else image.name


def output_layout(images: Sequence[Path], per_folder: int | None = None) -> OutputLayout:
    """The layout of `images`' outputs (see the module docstring)."""
    per_folder = per_folder or config.OUTPUTS_PER_FOLDER
    flat = [output_name(p) for p in images]
    if len(images) <= per_folder:
        return OutputLayout(flat, [])
    groups = _source_folders(images)
    sizes = Counter(groups)
    seen: dict[str, int] = defaultdict(int)
    names = []
    for group, name in zip(groups, flat, strict=True):
        parts = [group] if group else []
        if sizes[group] > per_folder:
            width = max(4, len(str((sizes[group] - 1) // per_folder)))
            parts.append(f"{seen[group] // per_folder:0{width}d}")
        seen[group] += 1
        names.append("/".join([*parts, name]))
    return OutputLayout(names, _folders_of(names))


def _source_folders(images: Sequence[Path]) -> list[str]:
    """Each image's folder relative to all images' common folder ('' when they share one)."""
    parents = [p.absolute().parent for p in images]
    if len(set(parents)) == 1:
        return [""] * len(images)
    common = Path(os.path.commonpath(parents))
    groups = []
    for parent in parents:
        parts = parent.relative_to(common).parts
        if parts and parts[-1] == IMAGES_DIR:  # a dataset folder: named by the dataset
            parts = parts[:-1]
        groups.append("/".join(parts))
    return groups


def _folders_of(names: list[str]) -> list[str]:
    """Every folder the names need, each after its parent."""
    folders: set[str] = set()
    for name in names:
        parent = PurePosixPath(name).parent
        while str(parent) != ".":
            folders.add(str(parent))
            parent = parent.parent
    return sorted(folders, key=lambda f: (f.count("/"), f))
