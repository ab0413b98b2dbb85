"""Polyp segmentation data: the benchmark folder layout and a synthetic generator.

Layout of the standard polyp benchmarks (PraNet / Polyp-PVT release)::

    ROOT/TrainDataset/{images,masks}/NAME.png
    ROOT/TestDataset/<dataset>/{images,masks}/NAME.png      (Kvasir, CVC-ClinicDB, ...)

``image/`` and ``mask/`` are accepted for ``images/`` and ``masks/``. Images and masks pair by
file stem (``a.jpg`` with ``a.png``); unpaired, duplicated or unreadable files are errors that
name them. Masks are read as the reference loaders read them (:class:`PolypDataset`: soft
bilinear masks for training, the ground truth binarised with ``> 128`` at its own size for
evaluation). :func:`make_synthetic_polyps` writes the same layout with generated images (no
download) for demos and tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from scipy import ndimage
from torch.utils.data import Dataset

from ..core.errors import InputError
from ..viz import save_image
from .images import list_images, read_rgb, to_tensor

IMAGE_DIRS = ("images", "image")
MASK_DIRS = ("masks", "mask")


def _subdir(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (folder / name).is_dir():
            return folder / name
    raise FileNotFoundError(f"{folder}: expected a sub-folder named {' or '.join(names)}")


def _by_stem(files: list[Path], what: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in files:
        if f.stem in out:
            raise InputError(f"two {what} share the stem {f.stem!r}: {out[f.stem].name} and {f.name}")
        out[f.stem] = f
    return out


def find_pairs(folder: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, mask) paths of a dataset folder with ``images/`` + ``masks/`` (or ``image/`` +
    ``mask/``), paired by stem and sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {folder}")
    images = _by_stem(list_images(_subdir(folder, IMAGE_DIRS)), "images")
    masks = _by_stem(list_images(_subdir(folder, MASK_DIRS)), "masks")
    no_mask = sorted(set(images) - set(masks))
    no_image = sorted(set(masks) - set(images))
    if no_mask or no_image:
        parts = []
        if no_mask:
            parts.append(f"images without a mask: {', '.join(images[s].name for s in no_mask[:10])}")
        if no_image:
            parts.append(f"masks without an image: {', '.join(masks[s].name for s in no_image[:10])}")
        raise InputError(f"{folder}: unpaired files ({len(no_mask) + len(no_image)}); " + "; ".join(parts))
    if not images:
        raise InputError(f"{folder}: no images found")
    return [(images[s], masks[s]) for s in sorted(images)]


def train_folder(root: str | os.PathLike) -> Path:
    """``ROOT/TrainDataset`` if it exists, else ``ROOT`` itself (a folder with images/masks)."""
    root = Path(root)
    return root / "TrainDataset" if (root / "TrainDataset").is_dir() else root


def find_test_sets(root: str | os.PathLike) -> dict[str, Path]:
    """Test datasets by name: the sub-folders of ``ROOT/TestDataset`` (or of ``ROOT``) that hold
    images/masks; a ``ROOT`` that is itself a dataset folder is returned under its own name."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"test data folder not found: {root}")
    if any((root / d).is_dir() for d in IMAGE_DIRS):
        return {root.name: root}
    base = root / "TestDataset" if (root / "TestDataset").is_dir() else root
    found = {
        d.name: d for d in sorted(base.iterdir())
        if d.is_dir() and any((d / s).is_dir() for s in IMAGE_DIRS)
    }
    if not found:
        raise InputError(f"{root}: no test datasets (expected TestDataset/<name>/images and masks)")
    return found


#: Ground-truth pixels above this grey level are polyp: ``gt > 128`` of the PraNet / Polyp-PVT
#: evaluation toolbox (``main.m``), which the polyp papers' Dice/IoU come from.
MASK_THRESHOLD = 128


def read_polyp_mask(path: str | os.PathLike, size: int | None = None, soft: bool = True) -> np.ndarray:
    """A ground-truth mask as the reference loaders read it: the grey-level image (PIL ``"L"``),

    * ``size`` given, ``soft=True``: resized to (size, size) with PIL's bilinear filter and
      scaled to [0, 1] (float32), i.e. ``transforms.Resize((size, size))`` + ``ToTensor()`` of
      the PraNet / Polyp-PVT training loader: soft values along the resampled boundary;
    * ``size`` given, ``soft=False``: nearest-neighbour resize, then ``> MASK_THRESHOLD`` (bool);
    * ``size=None``: the original resolution, ``> MASK_THRESHOLD`` (bool), as the evaluation
      toolbox binarises the test ground truth.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"mask not found: {path}")
    try:
        with Image.open(path) as im:
            grey = im.convert("L")
            if size is not None:
                grey = grey.resize((size, size), Image.BILINEAR if soft else Image.NEAREST)
            values = np.asarray(grey, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"cannot read mask {path}: {e}") from e
    if size is not None and soft:
        return values.astype(np.float32) / 255.0
    return values > MASK_THRESHOLD


class PolypDataset(Dataset):
    """(image, mask, stem) samples of one dataset folder, read as the PraNet / Polyp-PVT loaders
    (``utils/dataloader.py``) read them.

    ``size``: images are resized to (size, size) bilinearly (PIL) and ImageNet-normalised. Masks
    are float (1, H, W):

    * ``mask_size="same"`` (training): resized to (size, size) like the reference training loader
      (PIL bilinear resize of the grey mask, scaled to [0, 1]): soft values along the boundary,
      which the structure loss takes as they are. ``soft_masks=False`` gives hard {0, 1} masks
      instead (nearest resize, then ``> 128``: earlier foveal versions read training masks so), for
      metrics that need a binary mask at the input size (pointing game, explanation scores);
    * ``mask_size="original"`` (evaluation): the ground truth at its own resolution, binarised
      with ``> 128`` as the reference evaluation toolbox does (use batch size 1 then).

    See :func:`read_polyp_mask`; ``docs/segmentation.md`` explains the choice."""

    def __init__(self, folder: str | os.PathLike, size: int = 352, mask_size: str = "same",
                 soft_masks: bool = True) -> None:
        if mask_size not in ("same", "original"):
            raise InputError(f"mask_size must be 'same' or 'original', got {mask_size!r}")
        self.folder = Path(folder)
        self.pairs = find_pairs(folder)
        self.size = int(size)
        self.mask_size = mask_size
        self.soft_masks = bool(soft_masks)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        image_path, mask_path = self.pairs[index]
        image = to_tensor(read_rgb(image_path, (self.size, self.size)))
        size = self.size if self.mask_size == "same" else None
        mask = read_polyp_mask(mask_path, size, soft=self.soft_masks)
        return image, torch.from_numpy(mask).float()[None], image_path.stem


# --- synthetic polyps ---------------------------------------------------------------------

def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return n / (n.std() + 1e-8)


def synthetic_polyp(rng: np.random.Generator, size: int = 128, max_polyps: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """One colonoscopy-like image (uint8 (size, size, 3)) and its polyp mask (bool).

    Background: pink-red mucosa with low-frequency shading, fine texture, darker vessel-like
    curves and an endoscope vignette. Polyps: 1..``max_polyps`` blobs with irregular outlines
    (radius modulated by low-order Fourier terms), a lighter, more saturated tint, dome shading,
    their own texture and a specular highlight; edges are blended over about a pixel."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    base = np.array([190.0, 100.0, 90.0]) + rng.uniform(-20, 20, 3)
    shade = 1.0 + 0.12 * _smooth_noise(rng, size, size / 6) + 0.04 * _smooth_noise(rng, size, 1.5)
    img = base[None, None, :] * shade[..., None]
    for _ in range(rng.integers(2, 6)):  # vessels
        a, f, p, y0 = rng.uniform(0.03, 0.15), rng.uniform(0.4, 1.5), rng.uniform(0, 2 * np.pi), rng.uniform(0, 1)
        d = np.abs(yy - (y0 + a * np.sin(2 * np.pi * f * xx + p)))
        if rng.random() < 0.5:
            d = np.abs(xx - (y0 + a * np.sin(2 * np.pi * f * yy + p)))
        img *= (1.0 - 0.2 * np.exp(-((d * size / rng.uniform(0.7, 2.0)) ** 2)))[..., None]
    mask = np.zeros((size, size), bool)
    for _ in range(rng.integers(1, max_polyps + 1)):
        cy, cx = rng.uniform(0.25, 0.75, 2)
        r0 = rng.uniform(0.1, 0.22)
        theta = np.arctan2(yy - cy, xx - cx)
        radius = np.full_like(theta, r0)
        for k in range(2, 5):
            radius += r0 * rng.uniform(0.0, 0.1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        dist = np.hypot(yy - cy, xx - cx)
        inside = dist <= radius
        alpha = np.clip((radius - dist) * size + 0.5, 0.0, 1.0)  # ~1 px soft edge
        tint = np.array([235.0, 140.0, 120.0]) + rng.uniform(-15, 15, 3)
        dome = 1.0 + 0.25 * np.clip(1 - (dist / radius) ** 2, 0, 1) - 0.1 * (yy - cy) / r0
        texture = 1.0 + 0.06 * _smooth_noise(rng, size, 1.0)
        polyp = tint[None, None, :] * (dome * texture)[..., None]
        hy, hx = cy - 0.35 * r0, cx - 0.25 * r0  # specular highlight
        spec = np.exp(-(((yy - hy) ** 2 + (xx - hx) ** 2) / (0.15 * r0) ** 2)) * inside
        polyp = polyp + 120.0 * spec[..., None]
        img = (1 - alpha[..., None]) * img + alpha[..., None] * polyp
        mask |= inside
    vignette = 1.0 - 0.55 * np.clip(np.hypot(yy - 0.5, xx - 0.5) / 0.72, 0, 1) ** 3
    img = img * vignette[..., None] + rng.normal(0, 3.0, img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8), mask


def make_synthetic_polyps(
    out: str | os.PathLike,
    *,
    num_train: int = 40,
    num_test: int = 10,
    test_sets: tuple[str, ...] = ("SynthA", "SynthB"),
    size: int = 128,
    seed: int = 0,
) -> Path:
    """Write ``OUT/TrainDataset/{images,masks}`` and ``OUT/TestDataset/<name>/{images,masks}``
    of synthetic polyps (PNG, ``0000.png``...). Deterministic: the same arguments give the same
    files (each image has its own generator seeded by (seed, split, index))."""
    if size < 32:
        raise InputError(f"size must be >= 32, got {size}")
    out = Path(out)
    splits = [("TrainDataset", out / "TrainDataset", num_train)]
    splits += [(name, out / "TestDataset" / name, num_test) for name in test_sets]
    for split_id, (_, folder, count) in enumerate(splits):
        for i in range(count):
            rng = np.random.default_rng([seed, split_id, i])
            image, mask = synthetic_polyp(rng, size)
            save_image(image, folder / "images" / f"{i:04d}.png")
            save_image(mask, folder / "masks" / f"{i:04d}.png")
    return out
