"""PASCAL VOC 2012 segmentation (Everingham et al., IJCV 2010) with the SBD-augmented masks and
the image-level labels of weakly-supervised segmentation (Ahn & Kwak, CVPR 2018, "psa").

Layout (``ROOT`` = ``VOCdevkit/VOC2012``, ``VOCdevkit`` or their parent; all are accepted)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png         palette PNG: index 0..20 per pixel, 255 = boundary / ignore
    SegmentationClassAug/<id>.png      optional SBD-augmented masks (Hariharan et al. 2011) as
                                       single-channel index PNGs (psa, DeepLab); 10,582 train_aug ids
    ImageSets/Segmentation/{train,val,trainval}.txt     one id per line (1,464 / 1,449 / 2,913)

Splits are read from ``ImageSets/Segmentation/<split>.txt`` or ``ImageSets/SegmentationAug/
<split>.txt``, or ``split`` is the path of a list file. List lines are ids or psa's
``train_aug.txt`` form ``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``
(the id is the stem of the first field; the mask path is not used: masks are looked up by id).

Image-level labels (``"labels"``, float (20,), background excluded, in :data:`VOC_CLASSES`
order without background) are the classes present in the full-resolution mask (ignoring 0 and
255) or, with ``cls_labels=PATH``, read from psa's ``cls_labels.npy`` (a pickled dict id ->
float32 (20,); psa made it from the XML annotations, which can list objects the mask lacks).
Loading it unpickles: give only a trusted local file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core.errors import InputError
from .items import ItemDataset, close_matches, open_image

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
NUM_VOC_CLASSES = 20  # image-level labels: background excluded
IGNORE = 255


def _voc_palette() -> np.ndarray:
    """The 256-colour palette of the VOC devkit (``VOClabelcolormap.m``): the bits of the index,
    three at a time, fill red, green and blue from the most significant bit down."""
    palette = np.zeros((256, 3), np.uint8)
    for i in range(256):
        c, rgb = i, [0, 0, 0]
        for j in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - j)
            c >>= 3
        palette[i] = rgb
    return palette


#: (256, 3) uint8: 0 background black, 1 aeroplane (128, 0, 0), ..., 255 ignore (224, 224, 192).
VOC_PALETTE = _voc_palette()
VOC_PALETTE.setflags(write=False)

MASK_FOLDERS = {"class": "SegmentationClass", "aug": "SegmentationClassAug"}
LIST_FOLDERS = ("Segmentation", "SegmentationAug")


def write_voc_palette_png(path: str | os.PathLike, label_map: np.ndarray) -> None:
    """Write an (H, W) label map (values 0..255; 255 = ignore) as a mode "P" PNG with the VOC
    palette, as ``SegmentationClass`` stores it."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2 or label_map.size == 0:
        raise InputError(f"label_map must be a non-empty (H, W) array, got shape {label_map.shape}")
    if not np.issubdtype(label_map.dtype, np.integer) or label_map.min() < 0 or label_map.max() > 255:
        raise InputError(f"label_map must hold integers in 0..255, got {label_map.dtype} in "
                         f"[{label_map.min()}, {label_map.max()}]")
    im = Image.fromarray(label_map.astype(np.uint8))
    im.putpalette(VOC_PALETTE.tobytes())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def read_voc_label_png(path: str | os.PathLike) -> np.ndarray:
    """Class indices (H, W) uint8 of a VOC mask: the palette indices of a mode "P" PNG
    (``SegmentationClass``) or the values of a single-channel PNG (``SegmentationClassAug``), never
    the colours."""
    im = open_image(path, "VOC mask")
    if im.mode not in ("P", "L"):
        raise InputError(f"{path}: expected a palette (mode P) or single-channel (mode L) index PNG, found mode "
                         f"{im.mode} (colour-coded masks are not label maps)")
    return np.asarray(im, dtype=np.uint8).copy()


def voc_root(root: str | os.PathLike) -> Path:
    """The ``VOC2012`` folder of ``root`` (itself, ``root/VOC2012`` or ``root/VOCdevkit/VOC2012``)."""
    root = Path(root)
    tried = [root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"]
    for folder in tried:
        if (folder / "JPEGImages").is_dir():
            return folder
    raise FileNotFoundError(f"PASCAL VOC 2012 not found: none of {', '.join(str(t) for t in tried)} has JPEGImages/")


def voc_splits(root: str | os.PathLike) -> dict[str, Path]:
    """Split name -> list file, from ``ImageSets/Segmentation`` and ``ImageSets/SegmentationAug``."""
    base = voc_root(root) / "ImageSets"
    found: dict[str, Path] = {}
    for sub in LIST_FOLDERS:
        if (base / sub).is_dir():
            for p in sorted((base / sub).glob("*.txt")):
                found.setdefault(p.stem, p)
    return found


def read_id_list(path: str | os.PathLike) -> list[str]:
    """Ids of a VOC list file: plain ids or psa's ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``."""
    path = Path(path)
    ids = [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise InputError(f"{path}: the id list is empty")
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise InputError(f"{path}: id {i!r} is listed twice")
        seen.add(i)
    return ids


def load_cls_labels(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """psa's ``cls_labels.npy``: a pickled dict id -> float32 (20,) multi-hot. It is loaded with
    ``allow_pickle=True``, which can run code from the file: give only a trusted local file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cls_labels file not found: {path} (expected psa's cls_labels.npy)")
    try:
        obj = np.load(path, allow_pickle=True)
        table = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == () else obj
    except (ValueError, OSError) as e:
        raise InputError(f"cannot read {path} as psa's cls_labels.npy (a pickled dict id -> (20,) labels): {e}") from e
    if not isinstance(table, dict):
        raise InputError(f"{path}: expected a pickled dict id -> (20,) labels (psa's cls_labels.npy), found "
                         f"{type(table).__name__}")
    out = {}
    for key, value in table.items():
        value = np.asarray(value, dtype=np.float32)
        if value.shape != (NUM_VOC_CLASSES,):
            raise InputError(f"{path}: labels of {key!r} have shape {value.shape}, expected ({NUM_VOC_CLASSES},)")
        out[str(key)] = value
    return out


def labels_from_mask(mask: np.ndarray) -> np.ndarray:
    """float32 (20,) multi-hot: the classes 1..20 present in a label map (0 and 255 ignored)."""
    present = np.unique(mask)
    out = np.zeros(NUM_VOC_CLASSES, np.float32)
    out[present[(present >= 1) & (present <= NUM_VOC_CLASSES)] - 1] = 1
    return out


class VOCDataset(ItemDataset):
    """PASCAL VOC 2012 items: ``image``, ``id`` (e.g. ``2007_000032``), ``index``, ``label`` (-1),
    ``original_size``, ``labels`` float (20,) and, unless ``masks=None``, ``mask`` int64 (0..20, 255).

    ``split``: a name in ``ImageSets/Segmentation`` or ``ImageSets/SegmentationAug`` (``train``,
    ``val``, ``trainval``, ``train_aug`` where present) or the path of a list file.
    ``masks``: ``"auto"`` (``SegmentationClass/<id>.png``, else ``SegmentationClassAug/<id>.png``),
    ``"class"``, ``"aug"`` or None (no masks; then ``labels`` need ``cls_labels``).
    ``cls_labels``: psa's ``cls_labels.npy`` (trusted files only, it is unpickled); without it the
    labels are the classes present in the full-resolution mask, before any crop.
    Default geometry: ``"resize"`` to ``size``; ``size=None`` keeps the stored resolution (mIoU
    as psa computes it; batch size 1).
    """

    classes = VOC_CLASSES[1:]
    mask_classes = VOC_CLASSES

    def __init__(
        self, root: str | os.PathLike, split: str | os.PathLike = "train", *, masks: str | None = "auto",
        cls_labels: str | os.PathLike | None = None, size: int | Sequence[int] | None = 224,
        resize: str | None = None, **options,
    ) -> None:
        super().__init__(size=size, resize=resize, **options)
        self.root = voc_root(root)
        splits = voc_splits(self.root)
        split_path = Path(split)
        if str(split) in splits:
            list_file = splits[str(split)]
        elif split_path.suffix == ".txt" and split_path.is_file():
            list_file = split_path
        else:
            raise InputError(f"unknown VOC split {str(split)!r}{close_matches(str(split), list(splits))}: available in "
                             f"{self.root / 'ImageSets'}: {sorted(splits) or 'none'}; or give the path of a list file")
        self.split, self.list_file = str(split), list_file
        self.ids = read_id_list(list_file)
        no_jpeg = [i for i in self.ids if not (self.root / "JPEGImages" / f"{i}.jpg").is_file()]
        if no_jpeg:
            raise FileNotFoundError(f"{len(no_jpeg)} id(s) of {list_file} have no image "
                                    f"{self.root / 'JPEGImages'}/<id>.jpg, e.g. {no_jpeg[:3]}")
        if masks not in ("auto", "class", "aug", None):
            raise InputError(f"masks must be 'auto', 'class', 'aug' or None, got {masks!r}")
        self.masks = masks
        self.mask_paths: list[Path] | None = None
        if masks is not None:
            folders = [MASK_FOLDERS[masks]] if masks != "auto" else list(MASK_FOLDERS.values())
            self.mask_paths = []
            for i in self.ids:
                path = next((self.root / d / f"{i}.png" for d in folders if (self.root / d / f"{i}.png").is_file()),
                            None)
                if path is None:
                    raise FileNotFoundError(f"id {i!r} of {list_file} has no mask: expected "
                                            f"{' or '.join(str(self.root / d / f'{i}.png') for d in folders)} "
                                            "(masks=None reads images and cls_labels only)")
                self.mask_paths.append(path)
        self.cls_labels: dict[str, np.ndarray] | None = None
        if cls_labels is not None:
            table = load_cls_labels(cls_labels)
            missing = [i for i in self.ids if i not in table]
            if missing:
                raise InputError(f"{len(missing)} id(s) of {list_file} are not in {cls_labels}, e.g. {missing[:3]}")
            self.cls_labels = {i: table[i] for i in self.ids}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        id = self.ids[index]
        image = open_image(self.root / "JPEGImages" / f"{id}.jpg")
        mask = None
        if self.mask_paths is not None:
            mask = read_voc_label_png(self.mask_paths[index])
            bad = np.setdiff1d(np.unique(mask), np.r_[0:NUM_VOC_CLASSES + 1, IGNORE])
            if bad.size:
                raise InputError(f"{self.mask_paths[index]}: values {bad[:5].tolist()} are not VOC classes; expected "
                                 f"0..{NUM_VOC_CLASSES} and {IGNORE} (ignore)")
        if self.cls_labels is not None:
            labels = torch.from_numpy(self.cls_labels[id].copy())
        elif mask is not None:
            labels = torch.from_numpy(labels_from_mask(mask))
        else:
            labels = None
        return self._item(index, id, image, mask=mask, labels=labels)
