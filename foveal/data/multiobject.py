"""A synthetic multi-object segmentation set for weakly-supervised segmentation (no downloads).

Each image shows one to ``max_objects`` shapes (classes: the first ``num_classes`` kinds of
:data:`foveal.data.classification.SHAPES`, each with its own hue so tiny networks trained on a
CPU for a few epochs already recognise them) on a textured, weakly saturated background
(smooth noise plus faint stripes). Items carry the image-level labels that weak supervision may
use and the pixel-level ground truth it must not (for evaluation only). Deterministic for a
given seed.
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..core.errors import InputError
from .classification import SHAPES, shape_mask
from .images import IMAGENET_MEAN, IMAGENET_STD, to_tensor


def _texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A weakly saturated background (H, W, 3) in [0, 1]: smooth noise (mostly luminance, a faint
    tint) plus faint grey stripes."""
    coarse = torch.from_numpy(rng.normal(0, 1, size=(1, 1, 6, 6)) + 0.3 * rng.normal(0, 1, size=(1, 3, 6, 6)))
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    y, x = np.mgrid[0:size, 0:size]
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 10)
    stripes = np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period)[..., None]
    grey = rng.uniform(0.3, 0.6)
    img = grey + 0.06 * smooth.numpy() + 0.04 * stripes + rng.normal(0, 0.03, size=(size, size, 3))
    return np.clip(img, 0, 1)


def multiobject_image(
    size: int, num_classes: int, rng: np.random.Generator, max_objects: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """One uint8 image (H, W, 3) and its label map (H, W) int64 (0 = background, c + 1 = class c).
    Later objects are painted over earlier ones; an object hidden below half its area is
    repainted elsewhere so every listed class stays visible."""
    img = _texture(size, rng)
    labels = np.zeros((size, size), np.int64)
    count = int(rng.integers(1, max_objects + 1))
    for _ in range(count):
        c = int(rng.integers(num_classes))
        for _attempt in range(10):
            r = rng.uniform(0.13, 0.22) * size
            cx, cy = rng.uniform(r, size - r, size=2)
            mask = shape_mask(SHAPES[c], size, cx, cy, r, rng)
            if (labels[mask] == 0).mean() > 0.5:  # mostly on free background
                break
        hue = (c / num_classes + rng.uniform(-0.03, 0.03)) % 1.0
        colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0)))
        img[mask] = colour + rng.normal(0, 0.04, size=(int(mask.sum()), 3))
        labels[mask] = c + 1
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), labels


class MultiObjectDataset(Dataset):
    """In-memory synthetic multi-object set. Items are ``(image, labels, mask)``:

    * ``image``: float (3, S, S) normalised with ``mean``/``std`` (ImageNet by default);
    * ``labels``: float (K,) multi-hot image-level labels (the weak supervision);
    * ``mask``: int64 (S, S) ground truth, 0 = background, c + 1 = class c (evaluation only).

    ``rgb`` (N, S, S, 3) uint8, ``images``, ``labels`` and ``masks`` hold the whole set.
    """

    def __init__(
        self, n: int = 64, *, size: int = 64, num_classes: int = 3, max_objects: int = 3, seed: int = 0,
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
    ) -> None:
        if not 1 <= num_classes <= len(SHAPES):
            raise InputError(f"num_classes must be in 1..{len(SHAPES)}, got {num_classes}")
        if size < 16 or n < 1 or max_objects < 1:
            raise InputError(f"expected size >= 16, n >= 1, max_objects >= 1; got {size}, {n}, {max_objects}")
        rng = np.random.default_rng(seed)
        pairs = [multiobject_image(size, num_classes, rng, max_objects) for _ in range(n)]
        self.classes = list(SHAPES[:num_classes])
        self.rgb = np.stack([p[0] for p in pairs])
        self.masks = torch.from_numpy(np.stack([p[1] for p in pairs]))
        self.images = torch.stack([to_tensor(p[0], mean, std) for p in pairs])
        present = F.one_hot(self.masks.flatten(1), num_classes + 1).amax(1)[:, 1:]
        self.labels = present.float()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index], self.masks[index]
