"""What :func:`foveal.evaluation.evaluate` reads: any dataset, as items of the contract of
:mod:`foveal.data.items` (``image``, ``id``, ``index``, ``label`` and, where known, ``mask``,
``labels``).

* :class:`ItemView` turns the items of any dataset into that contract: dicts (the readers of
  :mod:`foveal.data`), tuples such as ``(image, label)`` or ``(image, mask, stem)``
  (:class:`~foveal.data.classification.ImageFolderDataset`, :class:`~foveal.data.polyp.PolypDataset`);
  a missing ``id`` becomes the zero-padded index, a missing ``label`` -1.
* :class:`TensorItems` is the in-memory case: a tensor of images, or a dict of tensors
  (``{"image": x, "mask": m, "label": y}``).
* :class:`BoxMasks`: ImageNet val with the bounding boxes of Kaggle's ``LOC_val_solution.csv``
  drawn as masks (the pointing game of Abs-CAM, sec. 4.3, scores points against boxes).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..core.errors import InputError


def _as_mask(value: torch.Tensor) -> torch.Tensor:
    """A (H, W) or (1, H, W) mask as int64 (H, W): bool / {0, 1} floats to {0, 1}, integers kept."""
    m = torch.as_tensor(value)
    if m.dim() == 3 and m.shape[0] == 1:
        m = m[0]
    if m.dim() != 2:
        raise InputError(f"mask: expected (H, W) or (1, H, W), got shape {tuple(m.shape)}")
    if m.dtype == torch.bool:
        return m.long()
    if m.is_floating_point():
        return (m > 0.5).long()
    return m.long()


def as_item(raw: Any, index: int) -> dict:
    """One item in the contract (see the module docstring)."""
    if isinstance(raw, Mapping):
        if "image" not in raw:
            raise InputError(f"dataset item {index}: a dict item needs an 'image', got keys {sorted(raw)}")
        item = dict(raw)
    elif isinstance(raw, (tuple, list)) and raw and isinstance(raw[0], torch.Tensor):
        item = {"image": raw[0]}
        for value in raw[1:]:
            if isinstance(value, str):
                item["id"] = value
            elif isinstance(value, torch.Tensor) and value.dim() >= 2:
                item["mask"] = value
            elif isinstance(value, (int, np.integer)) or (isinstance(value, torch.Tensor) and value.dim() == 0):
                item["label"] = int(value)
    elif isinstance(raw, torch.Tensor):
        item = {"image": raw}
    else:
        raise InputError(f"dataset item {index}: expected a dict with 'image', a tuple (image, ...) or an image "
                         f"tensor, got {type(raw).__name__}")
    image = item["image"]
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or not image.is_floating_point():
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"dataset item {index}: expected a float image (C, H, W), got {got}")
    item["index"] = int(index)
    item.setdefault("id", f"{index:08d}")
    item["id"] = str(item["id"])
    item["label"] = int(item.get("label", -1))
    if "mask" in item:
        item["mask"] = _as_mask(item["mask"])
    return item


class ItemView(Dataset):
    """``view[i]`` = ``as_item(dataset[i], i)``; keeps the wrapped dataset's ``transform``, ``ids``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return as_item(self.dataset[index], index)

    @property
    def transform(self):
        return getattr(self.dataset, "transform", None)


class TensorItems(Dataset):
    """In-memory items: ``images`` (N, C, H, W) and, optionally, ``mask`` (N, H, W), ``label`` (N,),
    ``labels`` (N, K), ``id`` (N strings)."""

    def __init__(self, data: torch.Tensor | Mapping[str, Any]) -> None:
        data = {"image": data} if isinstance(data, torch.Tensor) else dict(data)
        images = data.get("image")
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InputError(f"dataset: expected images (N, C, H, W) or a dict with 'image' (N, C, H, W), got {got}")
        n = images.shape[0]
        for key, value in data.items():
            if len(value) != n:
                raise InputError(f"dataset: {key!r} has {len(value)} entries, 'image' has {n}")
        unknown = sorted(set(data) - {"image", "mask", "label", "labels", "id"})
        if unknown:
            raise InputError(f"dataset: unknown keys {unknown}; expected image, mask, label, labels, id")
        self.data = data
        self.ids = [str(i) for i in data["id"]] if "id" in data else None

    def __len__(self) -> int:
        return self.data["image"].shape[0]

    def __getitem__(self, index: int) -> dict:
        item = {k: (v[index] if k != "label" else int(v[index])) for k, v in self.data.items()}
        return item


def read_boxes(path: str | os.PathLike) -> dict[str, list[tuple[str, int, int, int, int]]]:
    """Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString`` with ``wnid x1 y1 x2 y2`` repeated):
    image id -> [(wnid, x1, y1, x2, y2), ...] in pixels of the stored image (inclusive corners)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"bounding-box file not found: {path} (expected Kaggle's LOC_val_solution.csv)")
    lines = path.read_text().splitlines()
    if not lines or not lines[0].startswith("ImageId"):
        raise InputError(f"{path}: expected the header 'ImageId,PredictionString' of LOC_val_solution.csv")
    boxes: dict[str, list[tuple[str, int, int, int, int]]] = {}
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        image_id, _, rest = line.partition(",")
        fields = rest.split()
        if not fields or len(fields) % 5:
            raise InputError(f"{path}:{n}: expected 'wnid x1 y1 x2 y2' groups, found {rest.strip()!r}")
        try:
            boxes[image_id.strip()] = [(fields[i], *(int(float(v)) for v in fields[i + 1:i + 5]))
                                       for i in range(0, len(fields), 5)]
        except ValueError:
            raise InputError(f"{path}:{n}: box corners must be numbers, found {rest.strip()!r}") from None
    return boxes


class BoxMasks(Dataset):
    """A dataset whose items gain a ``mask``: the union of the image's bounding boxes (1 inside, 0
    outside), drawn at the stored resolution and given the image's own geometry (the dataset's
    ``transform``: resize / resize-crop, nearest). ILSVRC val boxes all belong to the image's class."""

    def __init__(self, dataset: Any, boxes: str | os.PathLike) -> None:
        self.dataset = dataset
        self.boxes = read_boxes(boxes)
        transform = getattr(dataset, "transform", None)
        if transform is None or not hasattr(transform, "mask"):
            raise InputError("bounding-box masks need a dataset of foveal.data (its transform maps them to the "
                             "image geometry)")
        ids = getattr(dataset, "ids", None)
        if ids is not None:
            missing = [i for i in ids if i not in self.boxes]
            if missing:
                raise InputError(f"{len(missing)} image(s) have no bounding box in {boxes}, e.g. {missing[:3]}")

    @property
    def transform(self):
        return self.dataset.transform

    @property
    def ids(self):
        return getattr(self.dataset, "ids", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        h, w = item["original_size"]
        boxes = self.boxes.get(item["id"])
        if boxes is None:
            raise InputError(f"image {item['id']!r} has no bounding box in the box file")
        mask = np.zeros((h, w), np.uint8)
        for _, x1, y1, x2, y2 in boxes:
            mask[max(0, y1):min(h, y2 + 1), max(0, x1):min(w, x2 + 1)] = 1
        item["mask"] = self.dataset.transform.mask(mask)
        return item


def as_dataset(data: Any) -> Dataset:
    """Tensors and dicts of tensors become :class:`TensorItems`; datasets are used as they are."""
    if isinstance(data, (torch.Tensor, Mapping)):
        return TensorItems(data)
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise InputError(f"dataset: expected a Dataset, an images tensor or a dict of tensors, got "
                         f"{type(data).__name__}")
    return data


def dataset_identity(dataset: Any) -> dict:
    """What identifies a dataset in the configuration hash: its type, size, item ids (hashed) and
    geometry / normalisation (not its location on disk, so a moved copy resumes)."""
    import dataclasses
    import hashlib

    ids = getattr(dataset, "ids", None)
    transform = getattr(dataset, "transform", None)
    identity: dict[str, Any] = {"type": type(dataset).__name__, "size": len(dataset)}
    if ids is not None:
        identity["ids_sha256"] = hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:16]
    if dataclasses.is_dataclass(transform):
        identity["transform"] = dataclasses.asdict(transform)
    if isinstance(dataset, TensorItems):
        x = dataset.data["image"]
        identity["image_sum"] = float(x.detach().double().sum())
    if isinstance(dataset, BoxMasks):
        identity["boxes"] = True
        identity["inner"] = dataset_identity(dataset.dataset)
    return identity
