"""Input checks and map normalisation shared by every component.

Checks raise :class:`InputError` naming what was expected and what came instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InputError


def describe(t: torch.Tensor) -> str:
    return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def resolve_device(requested: str | torch.device | None, name: str = "--device") -> torch.device:
    """``requested``, or CUDA when available and CPU otherwise (``None``); a CUDA device on a
    machine without one is an :class:`InputError` naming what this machine has."""
    if requested is None or requested == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"{name}: expected a torch device such as cpu, cuda or cuda:1, got {requested!r}") from e
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"{name}: {requested!r} asked for, but this machine has no usable CUDA device "
                             f"(torch {torch.__version__}); use cpu")
        if device.index is not None and device.index >= count:
            raise InputError(f"{name}: {requested!r} asked for, but this machine has {count} CUDA device(s)")
    return device


def check_finite(x: torch.Tensor, name: str) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"{name}: expected finite values, found {bad} NaN/Inf in {describe(x)}")


def check_images(images: object, *, channels: int | None = 3, name: str = "images") -> torch.Tensor:
    """Validate an image batch: float (B, C, H, W), finite, C == ``channels`` if given."""
    images = check_tensor(images, name)
    if images.dim() != 4:
        hint = " (add a batch dimension with images[None])" if images.dim() == 3 else ""
        raise InputError(
            f"{name}: expected a 4-D batch (B, C, H, W), got {describe(images)}{hint}"
        )
    if not images.is_floating_point():
        raise InputError(
            f"{name}: expected a floating-point tensor (convert uint8 with .float() / 255 "
            f"and normalise), got {describe(images)}"
        )
    if channels is not None and images.shape[1] != channels:
        raise InputError(
            f"{name}: expected {channels} channels in dim 1 (B, C, H, W), got {describe(images)}"
        )
    if images.shape[0] == 0:
        raise InputError(f"{name}: expected at least one image, got {describe(images)}")
    check_finite(images, name)
    return images


def check_maps(maps: object, *, like: torch.Tensor | None = None, name: str = "saliency") -> torch.Tensor:
    """Validate saliency maps (B, H, W) (a singleton channel (B, 1, H, W) is squeezed)."""
    maps = check_tensor(maps, name)
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.dim() != 3:
        raise InputError(f"{name}: expected (B, H, W) maps, got {describe(maps)}")
    if like is not None:
        if maps.shape[0] != like.shape[0] or maps.shape[-2:] != like.shape[-2:]:
            raise InputError(
                f"{name}: expected shape {(like.shape[0], *like.shape[-2:])} to match the images, "
                f"got {tuple(maps.shape)}"
            )
    check_finite(maps.float() if not maps.is_floating_point() else maps, name)
    return maps


def check_masks(masks: object, *, name: str = "masks") -> torch.Tensor:
    """Validate binary masks (B, H, W) of bool or {0, 1} values; returns a bool tensor."""
    masks = check_tensor(masks, name)
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.dim() != 3:
        raise InputError(f"{name}: expected (B, H, W) masks, got {describe(masks)}")
    if masks.dtype != torch.bool:
        check_finite(masks.float(), name)
        if not bool(((masks == 0) | (masks == 1)).all()):
            raise InputError(f"{name}: expected binary values {{0, 1}}, got other values in {describe(masks)}")
        masks = masks.bool()
    return masks


def normalize_maps(maps: torch.Tensor, eps: float = 1e-12, rtol: float = 1e-5) -> torch.Tensor:
    """Per-sample min-max normalisation of (B, ...) maps to [0, 1].

    A constant map becomes all zeros, never NaN. "Constant" means a spread of at most
    ``eps + rtol * max|map|``: float noise on a constant map (e.g. 1e-7 wiggles on a map of ones)
    is not stretched into a 0/1 pattern.
    """
    flat = maps.flatten(1)
    lo, hi = torch.aminmax(flat, dim=1, keepdim=True)  # one pass; max|map| = max(|lo|, |hi|)
    span = hi - lo
    tol = eps + rtol * torch.maximum(lo.abs(), hi.abs())
    out = torch.where(span > tol, (flat - lo) / span.clamp_min(eps), 0.0)
    return out.view_as(maps)


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of (B, h, w) maps to (B, *size)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def float_dtype(t: torch.Tensor) -> torch.dtype:
    """``t``'s dtype if floating point, else torch's default float dtype."""
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()
