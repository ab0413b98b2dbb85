"""Pairs of feature positions within a radius (AffinityNet, Ahn & Kwak CVPR 2018 sec. 3; psa
``search_dist``): the geometry shared by the affinity network, its labels and the random walk.

Two pair sets (``pairs=``):

* ``"psa"`` (default, issue 15 item 4): only the pairs psa forms. psa's ``get_indices_of_pairs``
  (``tool/pyutils.py``, used by ``resnet38_aff.Net.forward`` for training and for the random walk of
  ``infer_aff.py``) and ``ExtractAffinityLabelInRadius`` (``voc12/data.py``) take "from" positions
  only in rows ``0 .. h - radius`` and columns ``radius - 1 .. w - radius``, the region where every
  partner lies inside the map; positions near the left, right and bottom border relate to others
  only as partners of interior positions.
* ``"all"``: every pair of positions inside the map at distance ``0 < d < radius``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F

from ..core.errors import InputError

#: Label of a neutral (ignored) position, as in psa and PASCAL VOC.
IGNORE = 255

PairSet = Literal["psa", "all"]
PAIR_SETS = ("psa", "all")


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


def check_pairs(pairs: str) -> str:
    if pairs not in PAIR_SETS:
        raise InputError(f"pairs must be one of {PAIR_SETS}, got {pairs!r}")
    return pairs


@lru_cache(maxsize=32)
def _valid(size: tuple[int, int], radius: int, pairs: str) -> torch.Tensor:
    ones = torch.ones(1, *size)
    valid = torch.cat(partners(ones, radius, 0.0)).bool()
    if pairs == "psa":
        r = radius - 1
        source = torch.zeros(size, dtype=torch.bool)
        source[: max(size[0] - r, 0), r : max(size[1] - r, r)] = True
        valid &= source
    return valid


def pair_valid(size: tuple[int, int], radius: int, device=None, pairs: PairSet = "psa") -> torch.Tensor:
    """(P, h, w) bool: offset p of position (y, x) is a pair of the set ``pairs`` (module docstring):
    its partner ``(y + dy, x + dx)`` lies inside the map and, for ``"psa"``, (y, x) is one of psa's
    "from" positions."""
    return _valid(tuple(int(s) for s in size), int(radius), check_pairs(pairs)).to(device)
