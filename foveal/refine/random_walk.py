"""The random walk of AffinityNet (Ahn & Kwak, CVPR 2018, section 3.3; psa ``infer_aff.py``):
seed scores propagated with the transition matrix of learned affinities."""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Literal

import torch

from ..core.errors import InputError
from .pairs import pair_offsets, pair_valid

# --- random walk -----------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def _pair_index(h: int, w: int, radius: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat indices (from, to) of the valid pairs and their position in the (P, h, w) layout."""
    valid = pair_valid((h, w), radius)
    p, y, x = valid.nonzero(as_tuple=True)
    offsets = torch.tensor(pair_offsets(radius))
    src = y * w + x
    dst = (y + offsets[p, 0]) * w + (x + offsets[p, 1])
    flat = (p * h + y) * w + x
    return src, dst, flat


def transition_pairs(aff: torch.Tensor, beta: float, radius: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse ``T = A^beta / column sums`` of one image's affinities (P, h, w): (rows, cols, values),
    with both directions of every pair and the diagonal (affinity 1)."""
    h, w = aff.shape[-2:]
    src, dst, flat = (t.to(aff.device) for t in _pair_index(h, w, radius))
    a = aff.reshape(-1)[flat] ** beta
    n = h * w
    diag = torch.arange(n, device=aff.device)
    rows = torch.cat([src, dst, diag])
    cols = torch.cat([dst, src, diag])
    vals = torch.cat([a, a, torch.ones(n, dtype=aff.dtype, device=aff.device)])
    colsum = torch.zeros(n, dtype=aff.dtype, device=aff.device).index_add_(0, cols, vals)
    return rows, cols, vals / colsum[cols]


def random_walk(aff: torch.Tensor, scores: torch.Tensor, *, beta: float = 8, steps: int = 256,
                radius: int = 5, method: Literal["squaring", "sparse"] = "squaring") -> torch.Tensor:
    """``vec(scores) T^steps`` per image: affinities (B, P, h, w), scores (B, C, h, w) -> (B, C, h, w)."""
    b, c, h, w = scores.shape
    n = h * w
    out = []
    for i in range(b):
        rows, cols, vals = transition_pairs(aff[i], beta, radius)
        vec = scores[i].reshape(c, n)
        if method == "squaring":
            t = torch.zeros(n, n, dtype=aff.dtype, device=aff.device)
            t[rows, cols] = vals
            out.append(vec @ torch.linalg.matrix_power(t, steps))
        elif method == "sparse":
            tt = torch.sparse_coo_tensor(torch.stack([cols, rows]), vals, (n, n), check_invariants=True).coalesce()
            with warnings.catch_warnings():  # "sparse CSR support is in beta"; CSR products are 2-3x faster
                warnings.simplefilter("ignore", UserWarning)
                tt = tt.to_sparse_csr()
            v = vec.T.contiguous()
            for _ in range(steps):
                v = tt @ v
            out.append(v.T)
        else:
            raise InputError(f"random walk method must be 'squaring' or 'sparse', got {method!r}")
    return torch.stack(out).reshape(b, c, h, w)
