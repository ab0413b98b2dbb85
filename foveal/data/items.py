"""The item contract shared by the on-disk evaluation datasets: geometry, normalisation, collate.

Every dataset of :mod:`foveal.data.imagenet`, :mod:`foveal.data.imagenet_seg`,
:mod:`foveal.data.voc` and :mod:`foveal.data.datasets` returns, for ``dataset[i]``, a dict with

* ``"image"``: float (3, H, W), normalised with ``mean``/``std``;
* ``"id"``: str, unique within the dataset (file stem, VOC id, zero-padded ``.mat`` index);
* ``"index"``: int ``i``;
* ``"label"``: int class index of a single-label dataset, -1 when unknown;
* ``"original_size"``: (H, W) of the stored image, before any resizing;
* where known, ``"labels"``: float (K,) multi-hot image-level labels (VOC: K = 20, background
  excluded) and ``"mask"``: int64 (H, W) ground truth with 255 = ignore.

:class:`ItemTransform` applies the geometry to the image (bilinear, antialiased, as torchvision's
``Resize`` on a PIL image) and the same geometry to the mask (nearest), and :func:`collate`
stacks items into a batch for ``torch.utils.data.DataLoader(..., collate_fn=collate)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..core.errors import InputError
from .images import IMAGENET_MEAN, IMAGENET_STD

RESIZE_MODES = ("resize", "resize-crop", "none")
#: The standard ImageNet evaluation crop: resize the short side to size / 0.875 (256 for 224),
#: then centre crop (He et al. 2016; torchvision's reference scripts; timm's default crop_pct).
DEFAULT_CROP_PCT = 0.875


def as_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        out = (int(size), int(size))
    elif isinstance(size, Sequence) and len(size) == 2 and all(isinstance(s, (int, np.integer)) for s in size):
        out = (int(size[0]), int(size[1]))
    else:
        raise InputError(f"size must be an int, a pair (H, W) of ints or None, got {size!r}")
    if min(out) < 1:
        raise InputError(f"size must be positive, got {size!r}")
    return out


@dataclass(frozen=True)
class ItemTransform:
    """Geometry and normalisation of one item.

    ``resize``:

    * ``"resize"``: straight to ``size`` = (H, W), ignoring the aspect ratio (Chefer et al.'s
      ImageNet-segmentation and perturbation tests, ``transforms.Resize((224, 224))`` in
      ``baselines/ViT/imagenet_seg_eval.py`` and ``generate_visualizations.py``);
    * ``"resize-crop"``: the short side to ``round(max(H, W) / crop_pct)`` (aspect kept), then a
      centre crop of (H, W): for ``size=224`` exactly torchvision's ``Resize(256)`` +
      ``CenterCrop(224)``, the standard ImageNet evaluation;
    * ``"none"``: the stored resolution (``size`` must be None; batch with ``batch_size=1`` or
      same-size images), e.g. VOC mIoU at the original resolution as in psa.

    ``mean``/``std``: ImageNet's by default; many timm ViT checkpoints (``vit_base_patch16_224``
    as used by Chefer et al.) expect ``mean=std=(0.5, 0.5, 0.5)``: read ``model.pretrained_cfg``.
    """

    size: tuple[int, int] | None = (224, 224)
    resize: str = "resize"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = DEFAULT_CROP_PCT

    @classmethod
    def make(
        cls, size: int | Sequence[int] | None = 224, resize: str = "resize", mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD, crop_pct: float = DEFAULT_CROP_PCT,
    ) -> ItemTransform:
        """Validated constructor (``size`` may be an int)."""
        if resize not in RESIZE_MODES:
            raise InputError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        pair = as_size(size)
        if (pair is None) != (resize == "none"):
            raise InputError(f"resize='none' goes with size=None and only with it; got {resize=!r}, {size=!r}")
        mean_t, std_t = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean_t) != 3 or len(std_t) != 3 or min(std_t) <= 0:
            raise InputError(f"mean and std must be 3 numbers each (std > 0), got mean={mean!r}, std={std!r}")
        if not 0 < crop_pct <= 1:
            raise InputError(f"crop_pct must be in (0, 1], got {crop_pct}")
        return cls(pair, resize, mean_t, std_t, float(crop_pct))  # type: ignore[arg-type]

    def _geometry(self, im: Image.Image, interpolation) -> Image.Image:
        from torchvision.transforms import functional as TF

        if self.size is None:
            return im
        if self.resize == "resize":
            return TF.resize(im, list(self.size), interpolation=interpolation, antialias=True)
        short = int(round(max(self.size) / self.crop_pct))
        im = TF.resize(im, short, interpolation=interpolation, antialias=True)
        return TF.center_crop(im, list(self.size))

    def image(self, im: Image.Image) -> torch.Tensor:
        """PIL image -> normalised float (3, H, W)."""
        from torchvision.transforms import InterpolationMode

        rgb = np.asarray(self._geometry(im.convert("RGB"), InterpolationMode.BILINEAR), dtype=np.uint8)
        x = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0
        return (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]

    def mask(self, mask: np.ndarray) -> torch.Tensor:
        """Integer (H, W) mask with values in 0..255 -> int64 (H, W), same geometry, nearest."""
        from torchvision.transforms import InterpolationMode

        m = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))
        return torch.from_numpy(np.asarray(self._geometry(m, InterpolationMode.NEAREST), dtype=np.int64).copy())


class ItemDataset(Dataset):
    """Base of the datasets that follow the item contract: holds the :class:`ItemTransform`."""

    default_resize = "resize"

    def __init__(
        self, *, size: int | Sequence[int] | None = 224, resize: str | None = None,
        mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
        crop_pct: float = DEFAULT_CROP_PCT,
    ) -> None:
        if resize is None:
            resize = "none" if size is None else self.default_resize
        self.transform = ItemTransform.make(size, resize, mean, std, crop_pct)

    def _item(
        self, index: int, id: str, image: Image.Image, *, label: int = -1, mask: np.ndarray | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict:
        item = {
            "image": self.transform.image(image), "id": id, "index": int(index), "label": int(label),
            "original_size": (image.height, image.width),
        }
        if labels is not None:
            item["labels"] = labels
        if mask is not None:
            if mask.shape != (image.height, image.width):
                raise InputError(f"item {id!r}: mask is {mask.shape[0]}x{mask.shape[1]} but its image is "
                                 f"{image.height}x{image.width} (H x W); they must match")
            item["mask"] = self.transform.mask(mask)
        return item


def open_image(path, what: str = "image") -> Image.Image:
    """Open an image file and decode it now (the file handle is closed on return)."""
    from PIL import UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"cannot read {what} {path}: {e}") from e


def collate(items: list[dict]) -> dict:
    """Stack a list of items: tensors stacked, ints/floats and ``original_size`` as tensors
    ((B,) and (B, 2)), strings as lists. Every item must have the same keys (and the same image
    size: use ``size=...`` or ``batch_size=1``)."""
    if not items:
        raise InputError("collate got an empty list of items")
    keys = list(items[0])
    for item in items[1:]:
        if list(item) != keys:
            raise InputError(f"items to batch have different keys: {keys} and {list(item)}")
    out: dict = {}
    for key in keys:
        values = [item[key] for item in items]
        first = values[0]
        if isinstance(first, torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise InputError(f"cannot batch {key!r} of different shapes {sorted(shapes)}: give the dataset a "
                                 "size=... or use batch_size=1")
            out[key] = torch.stack(values)
        elif isinstance(first, str):
            out[key] = list(values)
        elif isinstance(first, bool) or not isinstance(first, (int, float, tuple)):
            raise InputError(f"collate cannot batch {key!r} of type {type(first).__name__}")
        else:
            out[key] = torch.tensor(values)
    return out


def close_matches(name: str, choices: Sequence[str], n: int = 3) -> str:
    """`` (did you mean a, b?)`` or an empty string."""
    import difflib

    found = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.6)
    return f" (did you mean {', '.join(found)}?)" if found else ""
