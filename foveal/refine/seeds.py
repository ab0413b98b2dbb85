"""From explanation seeds to confident labels: background scores and the affinity label map of
Ahn & Kwak (CVPR 2018) section 3.2, as used by vit-lrp-affinitynet.txt section 4.3."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import InputError
from .crf import dense_crf
from .pairs import IGNORE


def background_scores(seeds: torch.Tensor, alpha: float) -> torch.Tensor:
    """``[(1 - max_c M_c)^alpha, M_1, ..., M_K]``: (B, K + 1, H, W)."""
    bg = (1 - seeds.amax(1, keepdim=True)).clamp(min=0) ** alpha
    return torch.cat([bg, seeds], 1)



def affinity_label_map(
    seeds: torch.Tensor, size: tuple[int, int], *, alpha_low: float = 4, alpha_high: float = 32,
    crf: bool = False, images: np.ndarray | None = None,
) -> torch.Tensor:
    """Label map (B, h, w) int64 at the feature grid ``size`` from seeds (B, K, H, W) in [0, 1]:
    foreground class + 1 where the ``alpha_low`` argmax is foreground, 0 where the ``alpha_high``
    argmax is background, :data:`IGNORE` elsewhere and where no score is positive. ``crf`` needs
    ``images`` (B, H, W, 3) uint8."""
    maps = []
    for alpha in (alpha_low, alpha_high):
        scores = background_scores(seeds, alpha)
        if crf:
            if images is None:
                raise InputError("affinity_label_map: crf=True needs the uint8 images")
            scores = torch.stack([torch.from_numpy(dense_crf(im, s.detach().cpu().double().numpy()))
                                  for im, s in zip(images, scores)]).to(seeds)
        maps.append(F.interpolate(scores, size=size, mode="area"))
    low, high = maps
    label = low.argmax(1)
    label[label == 0] = IGNORE
    label[high.argmax(1) == 0] = 0
    label[low.amax(1) < 1e-5] = IGNORE
    return label
