"""The ImageNet-segmentation set (Guillaumin, Kuettel & Ferrari, IJCV 2014) as used by Chefer et
al. (CVPR 2021, sec. 4; the [Re] report on ViT LRP + AffinityNet, sec. 4-5): 4,276 images of 445
classes with foreground/background masks, in one MATLAB v7.3 file ``gtsegs_ijcv.mat``.

A v7.3 ``.mat`` file is HDF5. Its layout, read as in Chefer et al.'s ``data/Imagenet.py``
(``Imagenet_Segmentation``):

* ``value/img``: (N, 1) object references; reference i points at a uint8 array stored
  transposed as (C, W, H) (MATLAB is column-major), so ``image = f[ref][()].transpose(2, 1, 0)``;
* ``value/gt``: (N, 1) references to MATLAB cells; cell i is a (1, 1) array of references whose
  ``[0, 0]`` element points at the (W, H) mask, so ``mask = f[f[ref][0, 0]][()].transpose(1, 0)``.

Masks are {0, 1} (1 = object). The file carries no class labels: items have ``"label": -1``.
Items follow :mod:`foveal.data.items`; ``"id"`` is the zero-padded index in the file. The
default geometry is Chefer et al.'s: ``"resize"`` straight to 224 x 224 (``Resize((224, 224))``,
nearest for the mask); their ViT uses ``mean=std=(0.5, 0.5, 0.5)``, pass those for it.

The HDF5 file is opened lazily, once per process, on the first item read: an h5py handle must
not cross the fork into DataLoader workers, so only the path is pickled.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.errors import InputError
from .items import ItemDataset

EXPECTED = ("the MATLAB v7.3 (HDF5) gtsegs_ijcv.mat of the ImageNet-segmentation set (Guillaumin et al. 2014), "
            "with value/img and value/gt")


class ImageNetSegDataset(ItemDataset):
    """Items of ``gtsegs_ijcv.mat``: ``image``, ``mask`` int64 {0, 1}, ``id``, ``index``,
    ``label`` (-1), ``original_size``. ``classes`` = ("background", "object")."""

    classes = ("background", "object")

    def __init__(
        self, path: str | os.PathLike, *, size: int | Sequence[int] | None = 224, resize: str | None = None,
        **options,
    ) -> None:
        import h5py

        super().__init__(size=size, resize=resize, **options)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ImageNet-segmentation file not found: {self.path} (expected {EXPECTED})")
        if not h5py.is_hdf5(self.path):
            raise InputError(f"{self.path} is not an HDF5 file: expected {EXPECTED}; an older MATLAB file can be "
                             "re-saved with save(..., '-v7.3')")
        with h5py.File(self.path, "r") as f:
            for key in ("value/img", "value/gt"):
                if key not in f:
                    raise InputError(f"{self.path} has no {key!r} (top-level keys: {sorted(f.keys())}); expected "
                                     f"{EXPECTED}")
            img, gt = f["value/img"], f["value/gt"]
            if img.ndim != 2 or img.shape[1] != 1 or img.dtype != h5py.ref_dtype:
                raise InputError(f"{self.path}: value/img must be (N, 1) object references, found {img.shape} "
                                 f"{img.dtype}; expected {EXPECTED}")
            if gt.shape != img.shape or gt.dtype != h5py.ref_dtype:
                raise InputError(f"{self.path}: value/gt must be {img.shape} object references like value/img, "
                                 f"found {gt.shape} {gt.dtype}")
            self.length = int(img.shape[0])
        self._width = max(5, len(str(self.length - 1)))
        self._file = None
        self._pid: int | None = None

    def _h5(self):
        import h5py

        if self._file is None or self._pid != os.getpid():  # never reuse a handle inherited through fork
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, None
        return state

    def __len__(self) -> int:
        return self.length

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The stored image uint8 (H, W, 3) and mask (H, W) of item ``index``, untransformed."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        f = self._h5()
        image = np.asarray(f[f["value/img"][index, 0]][()]).transpose(2, 1, 0)
        mask = np.asarray(f[f[f["value/gt"][index, 0]][0, 0]][()]).transpose(1, 0)
        if image.ndim != 3 or image.shape[2] not in (1, 3) or image.dtype != np.uint8:
            raise InputError(f"{self.path}: image {index} is {image.dtype} {image.shape} after the (C, W, H) -> "
                             "(H, W, C) transposition; expected uint8 with 1 or 3 channels")
        if mask.shape != image.shape[:2]:
            raise InputError(f"{self.path}: mask {index} is {mask.shape} but its image is {image.shape[:2]} (H, W)")
        if not np.isin(mask, (0, 1)).all():
            raise InputError(f"{self.path}: mask {index} has values {np.unique(mask)[:10].tolist()}; expected {{0, 1}}")
        return image, mask.astype(np.uint8)

    def __getitem__(self, index: int) -> dict:
        image, mask = self.read(index)
        im = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
        return self._item(index, f"{index:0{self._width}d}", im, mask=mask)
