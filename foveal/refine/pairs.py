"""Pairs of feature positions within a radius (AffinityNet, Ahn & Kwak CVPR 2018 sec. 3; psa
``search_dist``): the geometry shared by the affinity network, its labels and the random walk."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from ..core.errors import InputError

#: Label of a neutral (ignored) position, as in psa and PASCAL VOC.
IGNORE = 255


@lru_cache(maxsize=16)
def pair_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """Offsets (dy, dx) to the partners of a position at distance ``0 < d < radius``, each
    unordered pair once (psa ``search_dist``): (0, 1..r-1), then dy = 1..r-1 for every dx."""
    r = int(radius)
    if r < 2:
        raise InputError(f"radius must be at least 2, got {radius}")
    out = [(0, dx) for dx in range(1, r)]
    out += [(dy, dx) for dy in range(1, r) for dx in range(-r + 1, r) if dx * dx + dy * dy < r * r]
    return tuple(out)


def partners(x: torch.Tensor, radius: int, fill: float) -> list[torch.Tensor]:
    """For every offset (dy, dx): ``out[..., y, x] = x[..., y + dy, x + dx]``, ``fill`` outside."""
    r = radius - 1
    h, w = x.shape[-2:]
    padded = F.pad(x, (r, r, 0, r), value=fill)
    return [padded[..., dy : dy + h, r + dx : r + dx + w] for dy, dx in pair_offsets(radius)]


@lru_cache(maxsize=16)
def _valid(size: tuple[int, int], radius: int) -> torch.Tensor:
    ones = torch.ones(1, *size)
    return torch.cat(partners(ones, radius, 0.0)).bool()


def pair_valid(size: tuple[int, int], radius: int, device=None) -> torch.Tensor:
    """(P, h, w) bool: the partner ``(y + dy, x + dx)`` of offset p lies inside the map."""
    return _valid(tuple(int(s) for s in size), int(radius)).to(device)
