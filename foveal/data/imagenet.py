"""ImageNet (ILSVRC-2012) on disk: class folders or the flat validation folder with a label file.

Class indices follow the canonical 1000-class order of ILSVRC-2012 (Russakovsky et al., IJCV
2015), which is the order of the sorted WordNet ids (torchvision's ``ImageFolder``/``ImageNet``,
timm, caffe's ``synsets.txt``) and the line order of Kaggle's ``LOC_synset_mapping.txt``
(``n01440764 tench, Tinca tinca`` per line). The two layouts read here:

* **class folders**, ``ROOT/<wnid>/<image>.JPEG`` (``val/n01440764/ILSVRC2012_val_00000293.JPEG``,
  the layout of torchvision's ``ImageNet`` after it sorted the validation images, and of the
  training set). Without a synset mapping the classes are the sorted folder names, which is the
  global index only when all 1000 folders are there. **A subset** (e.g. a 10-class copy to test on)
  keeps the 1000-class indices only with a mapping: give ``synset_mapping=`` or place
  ``LOC_synset_mapping.txt`` in ``ROOT`` or one of its parents.
* **flat**, ``ROOT/ILSVRC2012_val_00000001.JPEG ...`` (the official validation tar, Kaggle's
  ``ILSVRC/Data/CLS-LOC/val``) with a label file: Kaggle's ``LOC_val_solution.csv`` (header
  ``ImageId,PredictionString``; the first WordNet id of the prediction string is the label; needs
  the synset mapping) or a caffe-style ``val.txt`` (``ILSVRC2012_val_00000001.JPEG 65`` per line).

Files are found next to ``ROOT`` when not given: ``LOC_synset_mapping.txt`` and
``LOC_val_solution.csv`` in ``ROOT`` or up to four parents (Kaggle keeps them four levels above
``ILSVRC/Data/CLS-LOC/val``), ``val.txt`` in ``ROOT`` or its parent.

Items follow :mod:`foveal.data.items` with ``"label"`` the class index; the default geometry is
``"resize-crop"`` (Resize(256) + CenterCrop(224) for ``size=224``).
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

from ..core.errors import InputError
from .images import IMAGE_SUFFIXES
from .items import ItemDataset, close_matches, open_image

SYNSET_MAPPING = "LOC_synset_mapping.txt"
VAL_SOLUTION = "LOC_val_solution.csv"
VAL_TXT = "val.txt"
NUM_CLASSES = 1000
WNID = re.compile(r"^n\d{8}$")


def read_synset_mapping(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(wnids, names) from ``LOC_synset_mapping.txt``: line k is ``<wnid> <names>`` of class k."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"synset mapping not found: {path} (lines like 'n01440764 tench, Tinca tinca')")
    wnids, names = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not WNID.match(wnid):
            raise InputError(f"{path}:{n}: expected '<wnid> <names>' (wnid like n01440764), found {line.strip()!r}")
        wnids.append(wnid)
        names.append(name.strip() or wnid)
    if not wnids:
        raise InputError(f"{path}: the synset mapping is empty")
    if len(set(wnids)) != len(wnids):
        raise InputError(f"{path}: a WordNet id is listed twice")
    return wnids, names


def _find_upwards(root: Path, name: str, levels: int) -> Path | None:
    for folder in [root, *root.parents][: levels + 1]:
        if (folder / name).is_file():
            return folder / name
    return None


def _images(folder: Path) -> list[Path]:
    with os.scandir(folder) as it:
        return sorted(Path(e.path) for e in it if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES)


class ImageNetDataset(ItemDataset):
    """ImageNet images with their class index (see the module docstring for the layouts).

    ``layout``: ``"folders"``, ``"flat"`` or None (detected: image files directly in ``root``
    mean flat, sub-folders mean class folders). ``synset_mapping``: path of
    ``LOC_synset_mapping.txt`` (found next to ``root`` when None). ``labels``: for the flat
    layout, the path of ``LOC_val_solution.csv`` or ``val.txt`` (found when None).

    Attributes: ``classes`` (WordNet ids or folder names in index order), ``class_names``,
    ``num_classes``, ``samples`` (list of (path, label)), ``ids``.
    """

    default_resize = "resize-crop"

    def __init__(
        self, root: str | os.PathLike, *, layout: str | None = None, synset_mapping: str | os.PathLike | None = None,
        labels: str | os.PathLike | None = None, size: int | Sequence[int] | None = 224, resize: str | None = None,
        **options,
    ) -> None:
        super().__init__(size=size, resize=resize, **options)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageNet folder not found: {self.root}")
        mapping = Path(synset_mapping) if synset_mapping is not None else _find_upwards(self.root, SYNSET_MAPPING, 4)
        self.synset_mapping = mapping
        wnids, names = read_synset_mapping(mapping) if mapping is not None else (None, None)
        if layout is None:
            layout = "flat" if _images(self.root) else "folders"
        if layout == "folders":
            self._read_folders(wnids, names)
        elif layout == "flat":
            self._read_flat(wnids, names, labels)
        else:
            raise InputError(f"layout must be 'folders', 'flat' or None (detect), got {layout!r}")
        self.layout = layout
        self.num_classes = len(self.classes)
        stems = [p.stem for p, _ in self.samples]
        if len(set(stems)) == len(stems):
            self.ids = stems
        else:  # e.g. 0001.png in every class folder: ids become <class>/<stem>
            self.ids = [f"{p.parent.name}/{p.stem}" for p, _ in self.samples]

    def _read_folders(self, wnids: list[str] | None, names: list[str] | None) -> None:
        with os.scandir(self.root) as it:
            found = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
        if not found:
            raise InputError(f"{self.root}: expected class folders ROOT/<wnid>/*.JPEG or images ROOT/*.JPEG "
                             "with a label file; the folder is empty")
        splits = [c for c in found if c in ("train", "val", "test")]
        if splits and not any(WNID.match(c) for c in found):
            raise InputError(f"{self.root}: found split folders {splits}, expected class folders: point at "
                             f"{self.root / splits[-1]} (or give split={splits[-1]!r} to open_dataset)")
        if wnids is None:
            self.classes, self.class_names = found, list(found)
            if len(found) < NUM_CLASSES and all(WNID.match(c) for c in found):
                warnings.warn(
                    f"{self.root}: {len(found)} WordNet-id folders and no {SYNSET_MAPPING}: labels are indices into "
                    f"these {len(found)} sorted folders, not the 1000 ImageNet classes; give synset_mapping= to keep "
                    "the global indices", stacklevel=3)
        else:
            unknown = [c for c in found if c not in wnids]
            if unknown:
                raise InputError(f"{self.root}: class folder {unknown[0]!r} is not in the synset mapping "
                                 f"{self.synset_mapping}{close_matches(unknown[0], wnids)}"
                                 + (f" ({len(unknown)} unknown folders)" if len(unknown) > 1 else ""))
            self.classes, self.class_names = wnids, names
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples = []
        for c in found:
            files = _images(self.root / c)
            if not files:
                raise InputError(f"{self.root / c}: class folder has no images ({', '.join(IMAGE_SUFFIXES)})")
            self.samples += [(p, index[c]) for p in files]

    def _read_flat(self, wnids: list[str] | None, names: list[str] | None, labels: str | os.PathLike | None) -> None:
        files = _images(self.root)
        if not files:
            raise InputError(f"{self.root}: no images (expected ROOT/ILSVRC2012_val_00000001.JPEG ...)")
        if labels is None:
            found = _find_upwards(self.root, VAL_SOLUTION, 4) or _find_upwards(self.root, VAL_TXT, 1)
            if found is None:
                raise FileNotFoundError(
                    f"{self.root}: flat ImageNet folder without a label file: expected {VAL_SOLUTION} (in it or up to "
                    f"four parents) or {VAL_TXT} (in it or its parent), or labels=PATH")
            labels = found
        labels = Path(labels)
        if not labels.is_file():
            raise FileNotFoundError(f"ImageNet label file not found: {labels}")
        if labels.suffix.lower() == ".csv":
            if wnids is None:
                raise FileNotFoundError(
                    f"{labels} names classes by WordNet id; their indices need {SYNSET_MAPPING} (not found in "
                    f"{self.root} or its parents): pass synset_mapping=PATH")
            table = _read_solution_csv(labels, wnids)
        else:
            table = _read_val_txt(labels, len(wnids) if wnids is not None else NUM_CLASSES)
        self.label_file = labels
        self.classes = wnids if wnids is not None else [str(i) for i in range(NUM_CLASSES)]
        self.class_names = names if names is not None else list(self.classes)
        missing = [p.name for p in files if p.stem not in table]
        if missing:
            raise InputError(f"{self.root}: {len(missing)} image(s) have no label in {labels}, e.g. {missing[:3]}")
        self.samples = [(p, table[p.stem]) for p in files]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, label = self.samples[index]
        return self._item(index, self.ids[index], open_image(path), label=label)


def _read_solution_csv(path: Path, wnids: list[str]) -> dict[str, int]:
    """Kaggle's ``LOC_val_solution.csv``: ``ImageId,PredictionString`` with the prediction string
    ``wnid x1 y1 x2 y2 [wnid x1 y1 x2 y2 ...]`` (every box of the image has the same wnid)."""
    index = {w: i for i, w in enumerate(wnids)}
    table = {}
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise InputError(f"{path}: expected the header 'ImageId,PredictionString', found {header!r}")
        for n, row in enumerate(reader, 2):
            if not row:
                continue
            fields = row[1].split() if len(row) >= 2 else []
            if not fields:
                raise InputError(f"{path}:{n}: expected 'ImageId,<wnid> x1 y1 x2 y2 ...', found {','.join(row)!r}")
            if fields[0] not in index:
                raise InputError(f"{path}:{n}: WordNet id {fields[0]!r} is not in the synset mapping"
                                 f"{close_matches(fields[0], wnids)}")
            table[Path(row[0].strip()).stem] = index[fields[0]]
    return table


def _read_val_txt(path: Path, num_classes: int) -> dict[str, int]:
    """caffe's ``val.txt``: ``<file name> <class index>`` per line."""
    table = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            raise InputError(f"{path}:{n}: expected '<file name> <class index>', found {line.strip()!r}")
        label = int(parts[1])
        if not 0 <= label < num_classes:
            raise InputError(f"{path}:{n}: class index {label} is out of range 0..{num_classes - 1}")
        table[Path(parts[0]).stem] = label
    return table
