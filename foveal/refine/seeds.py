"""From explanation seeds to confident labels: background scores and the affinity label map of
Ahn & Kwak (CVPR 2018) section 3.2, as used by vit-lrp-affinitynet.txt section 4.3.

Two steps, split as psa splits them (``infer_cls.py`` writes the alpha-adjusted, optionally
CRF-refined score maps at full resolution; ``voc12/data.py`` ``VOC12AffDataset`` crops / flips those
scores with the image, average-pools them to the feature grid and only then takes the argmax):
:func:`label_scores` (full resolution) and :func:`labels_from_scores` (any grid).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import InputError
from .crf import dense_crf
from .pairs import IGNORE

#: A position whose scores are all below this carries no information (psa ``no_score_region``:
#: mostly the zero padding of a random crop) and is ignored.
NO_SCORE = 1e-5


def background_scores(seeds: torch.Tensor, alpha: float) -> torch.Tensor:
    """``[(1 - max_c M_c)^alpha, M_1, ..., M_K]``: (B, K + 1, H, W)."""
    if seeds.shape[1] == 0:  # no class present: background everywhere
        return torch.ones(seeds.shape[0], 1, *seeds.shape[-2:], dtype=seeds.dtype, device=seeds.device)
    bg = (1 - seeds.amax(1, keepdim=True)).clamp(min=0) ** alpha
    return torch.cat([bg, seeds], 1)


def label_scores(
    seeds: torch.Tensor, *, alpha_low: float = 4, alpha_high: float = 32, crf: bool = False,
    images: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two score sets (B, K + 1, H, W) of :func:`background_scores` with ``alpha_low`` and
    ``alpha_high``, each refined by the dense CRF when ``crf`` (needs ``images`` (B, H, W, 3) uint8)."""
    out = []
    for alpha in (alpha_low, alpha_high):
        scores = background_scores(seeds, alpha)
        if crf:
            if images is None:
                raise InputError("label_scores: crf=True needs the uint8 images")
            scores = torch.stack([torch.from_numpy(dense_crf(im, s.detach().cpu().double().numpy()))
                                  for im, s in zip(images, scores)]).to(seeds)
        out.append(scores)
    return out[0], out[1]


def labels_from_scores(low: torch.Tensor, high: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Label map (B, h, w) int64 from the score sets (B, C, H, W), area-pooled to ``size`` first
    (None: as they are): foreground class + 1 where the ``alpha_low`` argmax is foreground, 0 where
    the ``alpha_high`` argmax is background, :data:`IGNORE` elsewhere and where no score reaches
    :data:`NO_SCORE`."""
    if size is not None:
        low = F.interpolate(low, size=size, mode="area")
        high = F.interpolate(high, size=size, mode="area")
    label = low.argmax(1)
    label[label == 0] = IGNORE
    label[high.argmax(1) == 0] = 0
    label[low.amax(1) < NO_SCORE] = IGNORE
    return label


def affinity_label_map(
    seeds: torch.Tensor, size: tuple[int, int], *, alpha_low: float = 4, alpha_high: float = 32,
    crf: bool = False, images: np.ndarray | None = None,
) -> torch.Tensor:
    """Label map (B, h, w) int64 at the feature grid ``size`` from seeds (B, K, H, W) in [0, 1]:
    :func:`label_scores` then :func:`labels_from_scores`. ``crf`` needs ``images`` (B, H, W, 3) uint8."""
    low, high = label_scores(seeds, alpha_low=alpha_low, alpha_high=alpha_high, crf=crf, images=images)
    return labels_from_scores(low, high, size)
