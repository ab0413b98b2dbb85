"""Per-image files of the weakly-supervised pipeline: explanation seeds and label PNGs, written
atomically (a temporary file in the same folder renamed into place), so an interrupted run never
leaves a half-written file under a final name and a resumed run can skip every image whose file
exists.

* :class:`SeedStore`: ``<folder>/<id>.npz`` per image with ``seeds`` float16 (K_present, H, W) in
  [0, 1] at the image's stored resolution, ``classes`` int16 (K_present,) (foreground class
  indices, 0-based, in increasing order) and ``logits`` float32 (K,) of the classifier.
* :func:`write_label_png`: a label map as a VOC palette PNG (0 background, c + 1 class c, 255 ignore).
* :func:`shard`: the items a process takes (``items[rank::world]``: every item once over the ranks).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from ..core.errors import InputError

T = TypeVar("T")


def _atomic(path: Path, suffix: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def atomic_savez(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """``np.savez`` (uncompressed) of ``arrays`` to ``path`` through a temporary file."""
    path = Path(path)
    tmp = _atomic(path, ".npz")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_label_png(path: str | os.PathLike, label_map: np.ndarray) -> Path:
    """A (H, W) label map (0..255, 255 = ignore) as a VOC palette PNG, atomically."""
    from ..data.voc import write_voc_palette_png

    path = Path(path)
    tmp = _atomic(path, ".png")
    try:
        write_voc_palette_png(tmp, np.asarray(label_map))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """The indices (H, W) uint8 of a label PNG written by :func:`write_label_png`."""
    from ..data.voc import read_voc_label_png

    return read_voc_label_png(path)


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """The items of process ``rank`` of ``world``: ``items[rank::world]``."""
    if not 0 <= rank < world:
        raise InputError(f"rank {rank} out of range for {world} processes")
    return list(items[rank::world])


@dataclass
class SeedRecord:
    """One image's seeds: ``seeds`` float32 (K_present, H, W), ``classes`` (K_present,) int64
    foreground class indices, ``logits`` float32 (K,)."""

    seeds: torch.Tensor
    classes: torch.Tensor
    logits: torch.Tensor

    def dense(self, num_classes: int) -> torch.Tensor:
        """(num_classes, H, W) with zeros for the classes that are not present."""
        out = torch.zeros(num_classes, *self.seeds.shape[-2:])
        out[self.classes] = self.seeds
        return out


class SeedStore:
    """``<folder>/<id>.npz`` per image (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def path(self, id: str) -> Path:
        return self.folder / f"{id}.npz"

    def has(self, id: str) -> bool:
        return self.path(id).is_file()

    def write(self, id: str, seeds: torch.Tensor, classes: Sequence[int], logits: torch.Tensor) -> Path:
        seeds = torch.as_tensor(seeds).detach().float().cpu()
        classes = [int(c) for c in classes]
        if seeds.dim() != 3 or seeds.shape[0] != len(classes):
            raise InputError(f"seeds of {id!r}: expected ({len(classes)}, H, W) for classes {classes}, "
                             f"got {tuple(seeds.shape)}")
        if classes != sorted(set(classes)):
            raise InputError(f"seeds of {id!r}: classes must be distinct and increasing, got {classes}")
        if seeds.numel() and (float(seeds.min()) < 0 or float(seeds.max()) > 1):
            raise InputError(f"seeds of {id!r}: expected values in [0, 1], got "
                             f"[{float(seeds.min()):.3g}, {float(seeds.max()):.3g}]")
        return atomic_savez(self.path(id), seeds=seeds.numpy().astype(np.float16),
                            classes=np.asarray(classes, np.int16),
                            logits=torch.as_tensor(logits).detach().float().cpu().numpy())

    def read(self, id: str) -> SeedRecord:
        path = self.path(id)
        if not path.is_file():
            raise FileNotFoundError(f"seeds of {id!r} not found: {path} (run the seeds stage first)")
        try:
            with np.load(path) as f:
                seeds, classes, logits = f["seeds"], f["classes"], f["logits"]
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{path}: not a seed file (expected seeds, classes, logits): {e}") from e
        return SeedRecord(torch.from_numpy(seeds.astype(np.float32)), torch.from_numpy(classes.astype(np.int64)),
                          torch.from_numpy(logits))
