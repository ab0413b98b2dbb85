"""Image classification data: class-per-folder datasets and a synthetic shapes/textures set.

Layout (as torchvision's ``ImageFolder``): ``root/<class name>/<image>``; classes are the sorted
sub-folder names. A dataset root with ``train/`` and ``val/`` sub-folders is split this way by
:func:`split_folder`.
"""

from __future__ import annotations

import colorsys
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..core.errors import InputError
from .images import IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD

SHAPES = ("circle", "square", "triangle", "cross", "stripes", "checker", "ring", "diamond")


def classification_transform(
    image_size: int = 224, *, train: bool, crop_scale: tuple[float, float] = (0.08, 1.0),
    mean=IMAGENET_MEAN, std=IMAGENET_STD,
):
    """The usual ImageNet transforms. Train: random resized crop (``crop_scale`` of the area,
    aspect 3/4..4/3) to ``image_size``, horizontal flip. Eval: resize the short side to
    ``image_size / 0.875`` and centre crop. Both end with ``ToTensor`` and mean/std normalisation.
    Randomness comes from torch's global generator (per-worker seeded by the DataLoader)."""
    from torchvision import transforms as T

    if train:
        steps = [T.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(int(round(image_size / 0.875)), antialias=True), T.CenterCrop(image_size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


class ImageFolderDataset(Dataset):
    """Class-per-folder image dataset: items are ``(image (3, S, S) float, class index)``.

    ``classes`` fixes the class list (and order) instead of reading the sub-folders, so a
    validation split keeps the training split's indices; a class folder without images and a
    root without class folders are errors naming the folder.
    """

    def __init__(
        self, root: str | os.PathLike, *, train: bool = False, image_size: int = 224,
        crop_scale: tuple[float, float] = (0.08, 1.0), classes: list[str] | None = None, transform=None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {self.root}")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if classes is None:
            classes = found
        if not classes:
            raise InputError(f"{self.root}: expected one sub-folder per class (root/<class>/<image>), found none")
        missing = [c for c in classes if c not in found]
        if missing:
            raise InputError(f"{self.root}: class folders {missing} not found (found {found})")
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for c in self.classes:
            files = sorted(p for p in (self.root / c).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not files:
                raise InputError(f"{self.root / c}: class folder has no images ({', '.join(IMAGE_SUFFIXES)})")
            self.samples += [(p, self.class_to_idx[c]) for p in files]
        self.transform = transform or classification_transform(image_size, train=train, crop_scale=crop_scale)

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except OSError as e:
            raise InputError(f"cannot read image {path}: {e}") from e
        return self.transform(image), target


def split_folder(root: str | os.PathLike, split: str) -> Path:
    """``root/<split>`` when it exists (``train``/``val``), else ``root`` itself."""
    root = Path(root)
    return root / split if (root / split).is_dir() else root


# --- synthetic classes ----------------------------------------------------------------------

def shape_mask(kind: str, size: int, cx: float, cy: float, r: float, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = x - cx, y - cy
    box = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if kind == "circle":
        return dx**2 + dy**2 <= r**2
    if kind == "square":
        return box
    if kind == "triangle":  # apex up, base at cy + r
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    if kind == "cross":
        w = r / 3
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    if kind == "stripes":  # a square patch of stripes of random orientation
        angle = rng.uniform(0, np.pi)
        period = max(r / 2, 2.0)
        return box & (np.sin((dx * np.cos(angle) + dy * np.sin(angle)) * 2 * np.pi / period) > 0)
    if kind == "checker":
        cell = max(r / 2, 2.0)
        return box & ((np.floor(dx / cell) + np.floor(dy / cell)) % 2 == 0)
    if kind == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    raise InputError(f"unknown synthetic shape {kind!r}; expected one of {SHAPES}")


def synthetic_image(
    kind: str, size: int, rng: np.random.Generator, hue: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One (H, W, 3) uint8 image of a ``kind`` shape of random size and place on a noisy, weakly
    saturated background, and its bool object mask. The object's colour is saturated, of the
    given ``hue`` (in [0, 1), jittered) or of a random hue when ``hue`` is None."""
    r = rng.uniform(0.18, 0.32) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    mask = shape_mask(kind, size, cx, cy, r, rng)
    grey = rng.uniform(0.15, 0.65)
    bg = np.clip(grey + rng.uniform(-0.06, 0.06, size=3), 0, 1)
    img = bg + rng.normal(0, 0.05, size=(size, size, 3))
    h = rng.uniform() if hue is None else (hue + rng.uniform(-0.04, 0.04)) % 1.0
    fg = np.array(colorsys.hsv_to_rgb(h, rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0)))
    img[mask] = fg + rng.normal(0, 0.04, size=(int(mask.sum()), 3))
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), mask


def make_synthetic_classes(
    out: str | os.PathLike, *, num_classes: int = 4, train_per_class: int = 40, val_per_class: int = 10,
    size: int = 64, seed: int = 0, class_colours: bool = True, progress: bool = False,
) -> Path:
    """Write a small classification set of shapes/textures at random places as image folders
    ``out/{train,val}/<class>/NNNN.png`` (classes: the first ``num_classes`` of :data:`SHAPES`).

    With ``class_colours`` each class also has its own object hue (``k / num_classes``, jittered),
    so networks trained from scratch for a few epochs on a CPU already classify well; the
    evidence is still only inside the object (the background is grey and class-independent),
    which is what saliency metrics probe. ``class_colours=False`` leaves only the shape.
    Deterministic for a given seed. Returns ``out``."""
    if not 2 <= num_classes <= len(SHAPES):
        raise InputError(f"num_classes must be in 2..{len(SHAPES)}, got {num_classes}")
    if size < 16:
        raise InputError(f"size must be at least 16 pixels, got {size}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    jobs = [(split, kind, i) for split, n in (("train", train_per_class), ("val", val_per_class))
            for kind in SHAPES[:num_classes] for i in range(n)]
    for split, kind, i in tqdm(jobs, desc="synthetic classes", disable=not progress):
        hue = SHAPES.index(kind) / num_classes if class_colours else None
        img, _ = synthetic_image(kind, size, rng, hue)
        path = out / split / kind / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
    return out
