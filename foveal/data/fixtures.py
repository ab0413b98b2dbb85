"""Writers of tiny datasets in the exact on-disk formats the readers of :mod:`foveal.data` accept
(ImageNet class folders and flat validation folder with its label files, the ImageNet-
segmentation ``gtsegs_ijcv.mat``, PASCAL VOC 2012 with SBD-style masks and psa's label files).

Images show synthetic objects (:func:`foveal.data.classification.synthetic_image`,
:func:`foveal.data.multiobject.multiobject_image`: one shape and hue per class) at the places the
masks mark, so tiny models can learn and localise them. Everything is deterministic for a given
``seed``. Every writer returns the ground truth it wrote, for tests to compare against.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ..core.errors import InputError
from .classification import SHAPES, synthetic_image
from .items import as_size
from .multiobject import multiobject_image
from .voc import labels_from_mask, write_voc_palette_png

#: The first ten ILSVRC-2012 classes (global indices 0..9) with a short name each.
FIXTURE_SYNSETS = (
    ("n01440764", "tench"), ("n01443537", "goldfish"), ("n01484850", "great white shark"),
    ("n01491361", "tiger shark"), ("n01494475", "hammerhead"), ("n01496331", "electric ray"),
    ("n01498041", "stingray"), ("n01514668", "cock"), ("n01514859", "hen"), ("n01518878", "ostrich"),
)


def _crop(array: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Centre (H, W) window of a square array."""
    top, left = (array.shape[0] - hw[0]) // 2, (array.shape[1] - hw[1]) // 2
    return array[top:top + hw[0], left:left + hw[1]].copy()


def _class_image(index: int, num_classes: int, hw: tuple[int, int], rng: np.random.Generator):
    """Image and bool mask of class ``index``: shape ``SHAPES[index % 8]``, hue ``index / num_classes``."""
    image, mask = synthetic_image(SHAPES[index % len(SHAPES)], max(hw), rng, hue=index / max(num_classes, 1))
    return _crop(image, hw), _crop(mask, hw)


def _save_jpeg(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="JPEG", quality=95)


def _write_mapping(path: Path, synsets: Sequence[tuple[str, str]]) -> None:
    path.write_text("".join(f"{w} {name}\n" for w, name in synsets))


def write_imagenet_folders(
    root: str | os.PathLike, *, classes: Sequence[str] = tuple(w for w, _ in FIXTURE_SYNSETS[:3]), per_class: int = 2,
    size: int | Sequence[int] = 48, seed: int = 0, synsets: Sequence[tuple[str, str]] | None = FIXTURE_SYNSETS,
) -> dict[str, int]:
    """Write ``root/<wnid>/ILSVRC2012_val_<k>.JPEG`` (``per_class`` images for each wnid of
    ``classes``, numbered across the set) and, unless ``synsets`` is None, ``root/
    LOC_synset_mapping.txt`` listing ``synsets`` (the class order). Returns id (stem) -> class
    index: the position in ``synsets``, or in the sorted ``classes`` without a mapping."""
    root, hw = Path(root), as_size(size)
    order = [w for w, _ in synsets] if synsets is not None else sorted(classes)
    unknown = [c for c in classes if c not in order]
    if unknown:
        raise InputError(f"classes {unknown} are not in synsets {order}")
    rng = np.random.default_rng(seed)
    truth, k = {}, 0
    for wnid in classes:
        label = order.index(wnid)
        for _ in range(per_class):
            k += 1
            stem = f"ILSVRC2012_val_{k:08d}"
            image, _ = _class_image(label, len(order), hw, rng)
            _save_jpeg(image, root / wnid / f"{stem}.JPEG")
            truth[stem] = label
    if synsets is not None:
        _write_mapping(root / "LOC_synset_mapping.txt", synsets)
    return truth


def write_ilsvrc_flat(
    root: str | os.PathLike, *, n: int = 6, classes: Sequence[str] = tuple(w for w, _ in FIXTURE_SYNSETS[:3]),
    size: int | Sequence[int] = 48, seed: int = 0, synsets: Sequence[tuple[str, str]] | None = FIXTURE_SYNSETS,
    solution_csv: bool = True, val_txt: bool = True,
) -> dict[str, int]:
    """Write the flat validation layout ``root/ILSVRC2012_val_0000000k.JPEG`` (k = 1..n, classes in
    turn) with, in ``root``: Kaggle's ``LOC_val_solution.csv`` (rows shuffled; the object's box,
    twice for every other image, as images with several boxes), caffe's ``val.txt`` and
    ``LOC_synset_mapping.txt`` (unless disabled). Returns id (stem) -> class index."""
    root, hw = Path(root), as_size(size)
    order = [w for w, _ in synsets] if synsets is not None else sorted(classes)
    rng = np.random.default_rng(seed)
    truth, rows = {}, []
    for k in range(1, n + 1):
        wnid = classes[(k - 1) % len(classes)]
        label = order.index(wnid)
        stem = f"ILSVRC2012_val_{k:08d}"
        image, mask = _class_image(label, len(order), hw, rng)
        _save_jpeg(image, root / f"{stem}.JPEG")
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = (xs.min(), ys.min(), xs.max(), ys.max()) if len(xs) else (0, 0, hw[1] - 1, hw[0] - 1)
        box = f"{wnid} {x0} {y0} {x1} {y1}"
        rows.append(f"{stem},{' '.join([box] * (1 + k % 2))} ")
        truth[stem] = label
    root.mkdir(parents=True, exist_ok=True)
    if solution_csv:
        rows = [rows[i] for i in rng.permutation(len(rows))]
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    if val_txt:
        (root / "val.txt").write_text("".join(f"{s}.JPEG {label}\n" for s, label in truth.items()))
    if synsets is not None:
        _write_mapping(root / "LOC_synset_mapping.txt", synsets)
    return truth


def write_imagenet_seg_mat(
    path: str | os.PathLike, *, n: int = 3, size: int | Sequence[int] = (40, 56), seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Write an HDF5 file with the structure of the MATLAB v7.3 ``gtsegs_ijcv.mat``: a 512-byte
    MATLAB header block, ``value/img`` (n, 1) references to uint8 (3, W, H) arrays and
    ``value/gt`` (n, 1) references to (1, 1) cells of references to (W, H) uint8 {0, 1} masks, the
    referenced data in ``#refs#``. Image i is (H + 2i, W) for ``size`` = (H, W). Returns the
    [(image (H, W, 3) uint8, mask (H, W) uint8)] written."""
    import h5py

    path, (h, w) = Path(path), as_size(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = [_class_image(i, n, (h + 2 * i, w), rng) for i in range(n)]
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        value = f.create_group("value")
        img = value.create_dataset("img", (n, 1), dtype=h5py.ref_dtype)
        gt = value.create_dataset("gt", (n, 1), dtype=h5py.ref_dtype)
        for i, (image, mask) in enumerate(written):
            d = refs.create_dataset(f"img{i}", data=image.transpose(2, 1, 0))
            d.attrs["MATLAB_class"] = np.bytes_("uint8")
            m = refs.create_dataset(f"gt{i}", data=mask.astype(np.uint8).transpose(1, 0))
            m.attrs["MATLAB_class"] = np.bytes_("uint8")
            cell = refs.create_dataset(f"cell{i}", (1, 1), dtype=h5py.ref_dtype)
            cell[0, 0] = m.ref
            cell.attrs["MATLAB_class"] = np.bytes_("cell")
            img[i, 0], gt[i, 0] = d.ref, cell.ref
        value.attrs["MATLAB_class"] = np.bytes_("struct")
    header = b"MATLAB 7.3 MAT-file, written by foveal.data.fixtures, HDF5 schema 1.00 ."
    with path.open("r+b") as fh:  # the text header, subsystem offset, version 0x0200 and endian 'IM'
        fh.write(header.ljust(116, b" ") + b"\0" * 8 + b"\x00\x02" + b"IM")
    return [(image, mask.astype(np.uint8)) for image, mask in written]


def _with_boundaries(label_map: np.ndarray) -> np.ndarray:
    """VOC's ignore band: 255 wherever a 3 x 3 neighbourhood holds two labels (both sides of
    every object outline)."""
    edge = ndimage.grey_dilation(label_map, size=3) != ndimage.grey_erosion(label_map, size=3)
    out = label_map.copy()
    out[edge] = 255
    return out


def write_voc(
    root: str | os.PathLike, *, n_train: int = 4, n_val: int = 2, n_aug: int = 2, classes: Sequence[int] = (1, 7, 15),
    size: int | Sequence[int] = (40, 56), seed: int = 0, max_objects: int = 2, ids: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Write ``root/VOCdevkit/VOC2012`` with ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``
    (palette PNGs, 255 on object outlines) for the train and val ids, ``SegmentationClassAug/
    <id>.png`` (single-channel) for all ids (the ``n_aug`` SBD-only ids without the 255 band, as
    SBD has none), ``ImageSets/Segmentation/{train,val,trainval}.txt``, psa's
    ``ImageSets/SegmentationAug/train_aug.txt`` (train + SBD-only ids, psa's path format) and
    psa's ``root/cls_labels.npy`` (train_aug + val ids). Objects are of the VOC classes
    ``classes`` (indices 1..20). ``ids`` (``n_train + n_val + n_aug`` of them, in that order) replaces
    the generated ids (``2007_000032``, ...; ``2008_...`` for SBD-only). Returns id -> label map
    (H, W) uint8 as written."""
    root, hw = Path(root), as_size(size)
    if not classes or not all(1 <= c <= 20 for c in classes) or len(classes) > len(SHAPES):
        raise InputError(f"classes must be 1..{len(SHAPES)} VOC class indices in 1..20, got {classes}")
    if ids is not None and (len(ids) != n_train + n_val + n_aug or len(set(ids)) != len(ids)):
        raise InputError(f"ids must be {n_train + n_val + n_aug} distinct ids (n_train + n_val + n_aug), got {ids}")
    voc = root / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(seed)
    lut = np.array([0, *classes], np.uint8)
    groups = {"train": n_train, "val": n_val, "aug": n_aug}
    members: dict[str, list[str]] = {}
    truth: dict[str, np.ndarray] = {}
    k = 0
    for group, count in groups.items():
        members[group] = []
        for _ in range(count):
            id = ids[k] if ids is not None else f"{2007 if group != 'aug' else 2008}_{32 + 7 * k:06d}"
            k += 1
            image, labels = multiobject_image(max(hw), len(classes), rng, max_objects)
            image, label_map = _crop(image, hw), lut[_crop(labels, hw)]
            if group != "aug":
                label_map = _with_boundaries(label_map)
                write_voc_palette_png(voc / "SegmentationClass" / f"{id}.png", label_map)
            _save_jpeg(image, voc / "JPEGImages" / f"{id}.jpg")
            (voc / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
            Image.fromarray(label_map).save(voc / "SegmentationClassAug" / f"{id}.png")
            members[group].append(id)
            truth[id] = label_map
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    for name, listed in (("train", members["train"]), ("val", members["val"]),
                         ("trainval", members["train"] + members["val"])):
        (lists / f"{name}.txt").write_text("".join(f"{i}\n" for i in listed))
    aug = voc / "ImageSets" / "SegmentationAug"
    aug.mkdir(parents=True, exist_ok=True)
    (aug / "train_aug.txt").write_text(
        "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in members["train"] + members["aug"]))
    psa_ids = members["train"] + members["aug"] + members["val"]
    np.save(root / "cls_labels.npy", {i: labels_from_mask(truth[i]) for i in psa_ids}, allow_pickle=True)
    return truth

