"""Reading, normalising and writing images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..core.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _read(path: str | os.PathLike, mode: str, size: tuple[int, int] | None, resample: int, what: str) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if size is not None:
                im = im.resize((size[1], size[0]), resample)
            return np.asarray(im, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"cannot read {what} {path}: {e}") from e


def read_rgb(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read an image as uint8 RGB (H, W, 3), optionally resized to ``size`` = (H, W) (bilinear)."""
    return _read(path, "RGB", size, Image.BILINEAR, "image")


def read_mask(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a mask as bool (H, W): pixels > 127 of the grey-level image (nearest resize)."""
    return _read(path, "L", size, Image.NEAREST, "mask") > 127


def to_tensor(rgb: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (H, W, 3) -> normalised float (3, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def to_uint8(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Normalised float (B, 3, H, W) or (3, H, W) -> uint8 (B, H, W, 3) or (H, W, 3)."""
    x = images.detach().float().cpu()
    x = x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()
