"""Augmentations of the weakly-supervised trainers, drawn from an explicit generator so that an
item's augmentation depends only on (seed, epoch, index): the same batches after a resume, on any
number of DataLoader workers or torchrun processes.

* :func:`color_jitter`: torchvision's ``ColorJitter`` (random order of brightness, contrast,
  saturation and hue, factors drawn in torchvision's order) on a PIL image, as psa's ``train_cls.py``
  / ``train_aff.py`` apply ``ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1)``
  and vit-lrp-affinitynet.txt section 5.4 names "color jittering".
* :func:`crop_box`: psa's ``imutils.RandomCrop`` / ``get_random_crop_box``: a ``size`` x ``size``
  window; a side shorter than ``size`` is placed at a random offset inside a zero container.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image

from ..core.errors import InputError

#: psa's colour jitter (brightness, contrast, saturation, hue).
PSA_JITTER = (0.3, 0.3, 0.3, 0.1)


def color_jitter(rgb: np.ndarray, gen: torch.Generator, strength: tuple[float, float, float, float] = PSA_JITTER
                 ) -> np.ndarray:
    """``torchvision.transforms.ColorJitter(*strength)`` on a uint8 (H, W, 3) image with the random
    draws taken from ``gen`` (torchvision takes them from the global generator, in the same order)."""
    from torchvision.transforms import functional as TF

    fn_idx = torch.randperm(4, generator=gen)
    ranges = [(max(0.0, 1 - v), 1 + v) for v in strength[:3]] + [(-strength[3], strength[3])]
    # torchvision turns a zero strength into None and draws nothing for it
    values = [float(torch.empty(1).uniform_(lo, hi, generator=gen)) if v > 0 else None
              for v, (lo, hi) in zip(strength, ranges)]
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    image = Image.fromarray(np.ascontiguousarray(rgb))
    for i in fn_idx.tolist():
        if values[i] is not None:
            image = ops[i](image, values[i])
    return np.array(image, dtype=np.uint8)


def crop_box(size_hw: tuple[int, int], crop: int, rng: np.random.Generator) -> tuple[slice, slice, slice, slice]:
    """psa's random crop box: (container rows, container cols, image rows, image cols) slices."""
    boxes = []
    for n in size_hw:
        space = n - crop
        if space > 0:
            cont, img = 0, int(rng.integers(space + 1))
        else:
            cont, img = int(rng.integers(-space + 1)), 0
        length = min(crop, n)
        boxes.append((slice(cont, cont + length), slice(img, img + length)))
    return boxes[0][0], boxes[1][0], boxes[0][1], boxes[1][1]


def crop_into(array: torch.Tensor, crop: int, box: tuple[slice, slice, slice, slice]) -> torch.Tensor:
    """Copy the box of a (C, H, W) tensor into a zero (C, crop, crop) container."""
    out = array.new_zeros(array.shape[0], crop, crop)
    out[:, box[0], box[1]] = array[:, box[2], box[3]]
    return out


def fit_batch(data, batch_size: int, world: int, who: str) -> int:
    """A global batch no larger than the data (psa drops the last incomplete batch, so a set smaller
    than one batch would train on nothing): the largest multiple of ``world`` up to ``len(data)``."""
    fitted = len(data) // world * world
    if fitted == 0:
        raise InputError(f"{who}: {len(data)} images cannot fill one batch on {world} processes")
    warnings.warn(f"{who}: batch_size {batch_size} is larger than the {len(data)} images; using {fitted}",
                  stacklevel=3)
    return fitted
