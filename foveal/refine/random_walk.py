"""The random walk of AffinityNet (Ahn & Kwak, CVPR 2018, section 3.3; psa ``infer_aff.py``;
vit-lrp-affinitynet.txt section 4.3): seed scores propagated with the transition matrix of learned
affinities.

``T = A^beta`` normalised over columns (psa), ``vec(M) T^t``. The paper writes ``D^-1 W^beta``
(row-normalised) applied as ``T vec(M)``; for the symmetric ``W`` both average every position's
neighbours with the same weights, so they are the same walk. Two presets of ``(beta, t)``
(:data:`WALK_PRESETS`): ``"psa"`` = beta 8, t = 2^logt = 256 (psa ``infer_aff.py`` defaults, its README
"beta=8, gamma=5, t=256 for all settings"), ``"paper"`` = beta 16, t 8 (vit-lrp-affinitynet.txt sec.
4.3, "values of 16 and 8 for the hyperparameters beta and t"; possibly psa's ``logt = 8`` read as t).
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Literal

import torch

from ..core.errors import InputError
from .pairs import PairSet, pair_offsets, pair_valid

#: Named (beta, t) settings of the walk; see the module docstring.
WALK_PRESETS: dict[str, dict[str, int]] = {"psa": {"beta": 8, "steps": 256}, "paper": {"beta": 16, "steps": 8}}

# --- random walk -----------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def _pair_index(h: int, w: int, radius: int, pairs: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat indices (from, to) of the valid pairs and their position in the (P, h, w) layout."""
    valid = pair_valid((h, w), radius, pairs=pairs)
    p, y, x = valid.nonzero(as_tuple=True)
    offsets = torch.tensor(pair_offsets(radius))
    src = y * w + x
    dst = (y + offsets[p, 0]) * w + (x + offsets[p, 1])
    flat = (p * h + y) * w + x
    return src, dst, flat


def transition_pairs(aff: torch.Tensor, beta: float, radius: int, pairs: PairSet = "psa"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse ``T = A^beta / column sums`` of one image's affinities (P, h, w): (rows, cols, values),
    with both directions of every pair of the set ``pairs`` and the diagonal (affinity 1)."""
    h, w = aff.shape[-2:]
    src, dst, flat = (t.to(aff.device) for t in _pair_index(h, w, radius, pairs))
    a = aff.reshape(-1)[flat] ** beta
    n = h * w
    diag = torch.arange(n, device=aff.device)
    rows = torch.cat([src, dst, diag])
    cols = torch.cat([dst, src, diag])
    vals = torch.cat([a, a, torch.ones(n, dtype=aff.dtype, device=aff.device)])
    colsum = torch.zeros(n, dtype=aff.dtype, device=aff.device).index_add_(0, cols, vals)
    return rows, cols, vals / colsum[cols]


def random_walk(aff: torch.Tensor, scores: torch.Tensor, *, beta: float = 8, steps: int = 256,
                radius: int = 5, method: Literal["squaring", "sparse"] = "squaring", pairs: PairSet = "psa"
                ) -> torch.Tensor:
    """``vec(scores) T^steps`` per image: affinities (B, P, h, w), scores (B, C, h, w) -> (B, C, h, w);
    ``pairs`` as in :mod:`foveal.refine.pairs` (the set the affinities were trained on)."""
    b, c, h, w = scores.shape
    n = h * w
    out = []
    for i in range(b):
        rows, cols, vals = transition_pairs(aff[i], beta, radius, pairs)
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
