"""One entry point to the on-disk datasets, :func:`open_dataset` (what ``--dataset KIND
--data-root ROOT`` resolves to), and the two generic folder datasets under the item contract of
:mod:`foveal.data.items`: a plain image folder and the polyp benchmark layout.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from .images import list_images
from .items import ItemDataset, close_matches, open_image
from .polyp import MASK_THRESHOLD, find_pairs, find_test_sets, train_folder

DATASET_KINDS = ("imagenet", "imagenet-seg", "voc", "polyp", "folder")
IMAGENET_SEG_FILE = "gtsegs_ijcv.mat"


def _binary_mask(path: Path, threshold: int = 127) -> np.ndarray:
    """{0, 1} uint8 (H, W): grey level > ``threshold`` (127, as :func:`foveal.data.images.read_mask`)."""
    return (np.asarray(open_image(path, "mask").convert("L")) > threshold).astype(np.uint8)


class FolderDataset(ItemDataset):
    """Image files and folders of images (each folder sorted by name; ``"label"`` -1; ids are the
    file stems), with binary masks from ``mask_folder`` matched by file stem (grey > 127 -> 1,
    else 0) when given. ``root`` is one folder or a sequence of files and folders (what
    ``foveal evaluate-explanations IMAGES...`` takes)."""

    def __init__(self, root: str | os.PathLike | Sequence[str | os.PathLike], *,
                 mask_folder: str | os.PathLike | None = None, **options) -> None:
        from .images import IMAGE_SUFFIXES

        super().__init__(**options)
        entries = [root] if isinstance(root, (str, os.PathLike)) else list(root)
        self.root = Path(entries[0]) if len(entries) == 1 else None
        self.images: list[Path] = []
        for entry in map(Path, entries):
            if entry.is_dir():
                self.images += list_images(entry)
            elif entry.is_file():
                if entry.suffix.lower() not in IMAGE_SUFFIXES:
                    raise InputError(f"{entry}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
                self.images.append(entry)
            else:
                raise FileNotFoundError(f"image or folder not found: {entry}")
        where = ", ".join(str(e) for e in entries)
        if not self.images:
            raise InputError(f"{where}: no images found")
        stems = [p.stem for p in self.images]
        if len(set(stems)) != len(stems):
            dup = next(s for s in stems if stems.count(s) > 1)
            raise InputError(f"{where}: two images share the stem {dup!r} (ids must be unique)")
        self.ids = stems
        self.masks: list[Path] | None = None
        if mask_folder is not None:
            if not Path(mask_folder).is_dir():
                raise FileNotFoundError(f"mask folder not found: {mask_folder}")
            by_stem = {p.stem: p for p in list_images(mask_folder)}
            missing = [p.name for p in self.images if p.stem not in by_stem]
            if missing:
                raise InputError(f"{len(missing)} image(s) of {where} have no mask with the same stem in "
                                 f"{mask_folder}, e.g. {missing[:3]}")
            self.masks = [by_stem[s] for s in stems]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        mask = _binary_mask(self.masks[index]) if self.masks is not None else None
        return self._item(index, self.ids[index], open_image(self.images[index]), mask=mask)


class PolypItemDataset(ItemDataset):
    """One polyp dataset folder (``images/`` + ``masks/``, see :mod:`foveal.data.polyp`) as items
    with ``"mask"`` {0, 1} and ``"label"`` -1. Masks are binarised with the polyp benchmarks'
    ``gt > 128`` (:data:`foveal.data.polyp.MASK_THRESHOLD`), as the segmentation evaluation does."""

    def __init__(self, folder: str | os.PathLike, **options) -> None:
        super().__init__(**options)
        self.folder = Path(folder)
        self.pairs = find_pairs(self.folder)
        self.ids = [image.stem for image, _ in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        image, mask = self.pairs[index]
        return self._item(index, self.ids[index], open_image(image), mask=_binary_mask(mask, MASK_THRESHOLD))


def _imagenet_folder(root: Path, split: str | None) -> Path:
    if split is None:
        return root
    tried = [root / split, root / "ILSVRC" / "Data" / "CLS-LOC" / split]  # the second: Kaggle's download
    for folder in tried:
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"ImageNet split {split!r} not found: tried {', '.join(str(t) for t in tried)}")


def open_dataset(kind: str, root: str | os.PathLike, split: str | None = None, **options) -> ItemDataset:
    """Open a dataset of ``kind`` at ``root``; ``options`` go to its class (``size``, ``resize``,
    ``mean``, ``std``, ``crop_pct`` and the kind's own options).

    * ``"imagenet"``: :class:`~foveal.data.imagenet.ImageNetDataset` of ``root/split`` (or Kaggle's
      ``root/ILSVRC/Data/CLS-LOC/split``), class folders or flat + label file, detected;
    * ``"imagenet-seg"``: :class:`~foveal.data.imagenet_seg.ImageNetSegDataset`; ``root`` is
      ``gtsegs_ijcv.mat`` or the folder holding it (no split);
    * ``"voc"``: :class:`~foveal.data.voc.VOCDataset`, ``split`` defaults to ``"val"``;
    * ``"polyp"``: :class:`PolypItemDataset` of ``root`` when it holds ``images/``; else ``split``
      ``"train"`` is ``root/TrainDataset`` and another name a test set (``root/TestDataset/<name>``);
    * ``"folder"``: :class:`FolderDataset` of ``root`` (``mask_folder=`` for masks; no split).
    """
    from .imagenet import ImageNetDataset
    from .imagenet_seg import ImageNetSegDataset
    from .voc import VOCDataset

    name = str(kind).strip().lower().replace("_", "-").replace(" ", "-")
    root = Path(root)
    if name not in DATASET_KINDS:
        raise InputError(f"unknown dataset kind {kind!r}{close_matches(name, DATASET_KINDS)}; expected one of "
                         f"{', '.join(DATASET_KINDS)}")
    if name in ("imagenet-seg", "folder") and split is not None:
        raise InputError(f"dataset kind {name!r} has no splits, got split={split!r}")
    if name == "imagenet":
        return ImageNetDataset(_imagenet_folder(root, split), **options)
    if name == "imagenet-seg":
        return ImageNetSegDataset(root / IMAGENET_SEG_FILE if root.is_dir() else root, **options)
    if name == "voc":
        return VOCDataset(root, "val" if split is None else split, **options)
    if name == "polyp":
        if split is None:
            return PolypItemDataset(root, **options)
        if split == "train":
            return PolypItemDataset(train_folder(root), **options)
        sets = find_test_sets(root)
        if split not in sets:
            raise InputError(f"polyp test set {split!r} not found in {root}{close_matches(split, list(sets))}; "
                             f"available: train, {', '.join(sets)}")
        return PolypItemDataset(sets[split], **options)
    return FolderDataset(root, **options)
