"""Token sequences of Vision Transformers arranged as image grids: the one helper shared by every
explainer that reads ViT activations (CAMs on ``blocks.i.norm1``) or attention (``vit-lrp`` and
its baselines)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.errors import InputError


def patch_grid(owner: nn.Module | None, n: int, image_hw: tuple[int, int]) -> tuple[int, int] | None:
    """(rows, cols) of ``n`` patch tokens for an input of ``image_hw``, or None.

    Tried in order: the owning model's ``patch_embed.grid_size`` (timm), its
    ``patch_embed.dynamic_feat_size(image_hw)`` (timm models with dynamic image size), then the
    grid of the image's aspect ratio (within 25 %) whose cell count is ``n``."""
    pe = getattr(owner, "patch_embed", None) if owner is not None else None
    candidates = []
    if pe is not None and getattr(pe, "grid_size", None) is not None:
        candidates.append(tuple(int(g) for g in pe.grid_size))
    if pe is not None and hasattr(pe, "dynamic_feat_size"):
        try:
            candidates.append(tuple(int(g) for g in pe.dynamic_feat_size(image_hw)))
        except Exception:  # noqa: BLE001 - only a guess
            pass
    for g in candidates:
        if g[0] * g[1] == n:
            return g
    return _aspect_grid(n, image_hw)


def token_grid(owner: nn.Module | None, n: int, image_hw: tuple[int, int]) -> tuple[int, int]:
    """:func:`patch_grid`, raising :class:`InputError` when no grid fits."""
    hw = patch_grid(owner, n, image_hw)
    if hw is None:
        raise InputError(f"cannot arrange {n} patch tokens in a grid for an input of size {tuple(image_hw)}")
    return hw


def tokens_to_grid(t: torch.Tensor, model: nn.Module, layer: nn.Module, image_hw: tuple[int, int]) -> torch.Tensor:
    """(B, N, D) tokens -> (B, D, h, w), dropping the ``num_prefix_tokens`` leading class/register
    tokens (from the timm model containing ``layer``; inferred as the fewest leading tokens whose
    removal leaves a grid of the image's aspect ratio when no such model is found)."""
    b, n, d = t.shape
    owner = next((m for m in model.modules() if hasattr(m, "num_prefix_tokens") and
                  any(x is layer for x in m.modules())), None)
    prefixes = [int(owner.num_prefix_tokens)] if owner is not None else list(range(min(n, 9)))
    for p in prefixes:
        hw = patch_grid(owner, n - p, image_hw)
        if hw is not None:
            return t[:, p:].reshape(b, hw[0], hw[1], d).permute(0, 3, 1, 2)
    raise InputError(
        f"cannot arrange {n} tokens (after dropping {prefixes} prefix tokens) into a grid of the image's "
        f"aspect ratio {image_hw}; pass reshape=fn mapping (B, N, D) to (B, D, h, w)"
    )


def _aspect_grid(m: int, image_hw: tuple[int, int]) -> tuple[int, int] | None:
    if m <= 0:
        return None
    ratio = image_hw[0] / image_hw[1]
    guess = max(1, round(math.sqrt(m * ratio)))
    for h in (guess, guess - 1, guess + 1):
        if h > 0 and m % h == 0:
            w = m // h
            if abs(h / w - ratio) <= 0.25 * ratio:
                return h, w
    return None
