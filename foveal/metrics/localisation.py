"""Localisation metrics of saliency maps against ground-truth masks.

* :func:`pointing_game` (Zhang et al. 2016; abs-cam.txt 4.3, eq. 6): is the map's maximum within
  ``tolerance`` pixels of the object?
* :func:`saliency_segmentation_statistics` / :func:`saliency_segmentation` (Chefer et al. 2021;
  vit-lrp-affinitynet.txt 5.2, Table 3): the map as a soft segmentation, thresholded at its
  mean, scored by pixel accuracy, mean average precision and mean IoU over {background,
  foreground}.

Maps are (B, H, W) of any real scale, masks (B, H, W) bool or {0, 1}; both are left
unmodified; results are on the maps' device.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..core.config import ComponentConfig
from ..core.errors import InputError
from ..core.metric import Metric, PooledMetric
from ..core.tensors import check_maps, check_masks, float_dtype, normalize_maps

__all__ = [
    "pointing_game", "average_precision", "saliency_segmentation_statistics", "reduce_saliency_segmentation",
    "saliency_segmentation", "SEGMENTATION_QUANTITIES",
]

SEGMENTATION_QUANTITIES = ("pixel-accuracy", "ap", "miou")


def _check(saliency: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    masks = check_masks(masks)
    saliency = check_maps(saliency)
    if saliency.shape[0] != masks.shape[0]:
        raise InputError(f"saliency {tuple(saliency.shape)} and masks {tuple(masks.shape)}: expected one mask per map, "
                         f"got {saliency.shape[0]} maps and {masks.shape[0]} masks")
    if saliency.shape != masks.shape:
        raise InputError(
            f"saliency {tuple(saliency.shape)} and masks {tuple(masks.shape)}: expected masks of the maps' size; "
            "resize the maps (foveal.core.resize_maps) or the masks (nearest neighbour) to one size before scoring"
        )
    if not saliency.is_floating_point():
        saliency = saliency.float()
    return saliency, masks.to(saliency.device)


def pointing_game(saliency: torch.Tensor, masks: torch.Tensor, tolerance: float = 15.0) -> torch.Tensor:
    """Per-image hit (1.0), miss (0.0) or not counted (NaN, empty mask) (B,).

    The point is the map's maximum; among equal maxima the first in row-major order
    (``torch.argmax``, as TorchRay's ``np.argmax``), so a constant map points at the top-left
    pixel. A hit is a mask pixel within Euclidean distance ``tolerance`` (pixels, inclusive)
    of the point; ``tolerance=0`` requires the point itself to be in the mask. Zhang et al.
    use 15 px at the image resolution. An empty mask is never a hit and is not counted.
    """
    saliency, masks = _check(saliency, masks)
    if tolerance < 0:
        raise InputError(f"tolerance: expected a non-negative number of pixels, got {tolerance}")
    b, h, w = masks.shape
    idx = saliency.flatten(1).argmax(1)
    py, px = (idx // w).to(torch.float64), (idx % w).to(torch.float64)
    ys = torch.arange(h, device=masks.device, dtype=torch.float64)[None, :, None]
    xs = torch.arange(w, device=masks.device, dtype=torch.float64)[None, None, :]
    near = (ys - py[:, None, None]) ** 2 + (xs - px[:, None, None]) ** 2 <= float(tolerance) ** 2 + 1e-9
    hit = (near & masks).flatten(1).any(1).to(saliency.dtype)
    empty = ~masks.flatten(1).any(1)
    return torch.where(empty, torch.full_like(hit, float("nan")), hit)


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row average precision (B,) of (B, N) scores against (B, N) bool labels.

    ``sum_n (R_n - R_{n-1}) P_n`` over distinct score thresholds (tied scores enter together),
    the step-wise definition of scikit-learn's ``average_precision_score`` (not interpolated).
    Rows without positives give NaN.
    """
    s = scores.double()
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    ss = s.gather(1, order)
    lab = labels.gather(1, order).double()
    tps = lab.cumsum(1)
    fps = (1 - lab).cumsum(1)
    pos = tps[:, -1:]
    precision = tps / (tps + fps)
    recall = tps / pos
    end = torch.ones_like(ss, dtype=torch.bool)
    end[:, :-1] = ss[:, 1:] != ss[:, :-1]  # last element of each group of tied scores
    at_end = torch.where(end, recall, torch.zeros_like(recall))
    prev = torch.zeros_like(recall)
    prev[:, 1:] = at_end.cummax(1).values[:, :-1]
    ap = torch.where(end, (recall - prev) * precision, torch.zeros_like(recall)).sum(1)
    return torch.where(pos[:, 0] > 0, ap, torch.full_like(ap, float("nan")))


def saliency_segmentation_statistics(saliency: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-image sufficient statistics (B, 7) float64 of the saliency-segmentation test:
    ``[correct, pixels, inter_bg, union_bg, inter_fg, union_fg, ap]``.

    Chefer et al.'s protocol (``imagenet_seg_eval.py``): the map is min-max normalised per image
    (a constant map becomes 0, where their code produces NaN and zeroes it: same threshold
    result), foreground = map > its mean, background = map <= mean. AP ranks both channels of
    each image together, ``1 - map`` for background and ``map`` for foreground, against the
    one-hot mask (so every image has positives).
    """
    saliency, masks = _check(saliency, masks)
    m = normalize_maps(saliency.double())
    fg = m > m.flatten(1).mean(1)[:, None, None]
    gt = masks
    correct = (fg == gt).flatten(1).sum(1).double()
    pixels = torch.full_like(correct, float(gt[0].numel()))
    inter_fg = (fg & gt).flatten(1).sum(1).double()
    union_fg = (fg | gt).flatten(1).sum(1).double()
    inter_bg = (~fg & ~gt).flatten(1).sum(1).double()
    union_bg = (~fg | ~gt).flatten(1).sum(1).double()
    flat = m.flatten(1)
    scores = torch.cat([1 - flat, flat], 1)
    labels = torch.cat([~gt.flatten(1), gt.flatten(1)], 1)
    ap = average_precision(scores, labels)
    return torch.stack([correct, pixels, inter_bg, union_bg, inter_fg, union_fg, ap], 1)


def _per_image(stats: torch.Tensor, quantity: str) -> torch.Tensor:
    if quantity == "pixel-accuracy":
        return stats[:, 0] / stats[:, 1]
    if quantity == "ap":
        return stats[:, 6]
    if quantity == "miou":
        ious = torch.stack([stats[:, 2] / stats[:, 3], stats[:, 4] / stats[:, 5]], 1)  # NaN if a union is 0
        return ious.nanmean(1)
    raise InputError(f"quantity: expected one of {SEGMENTATION_QUANTITIES}, got {quantity!r}")


def reduce_saliency_segmentation(stats: torch.Tensor, quantity: str, averaging: str = "pooled") -> float:
    """Dataset value of one quantity from stacked :func:`saliency_segmentation_statistics`.

    ``"pooled"`` (Chefer et al. for pixel accuracy and mIoU): total correct / total pixels;
    per class total intersection / total union, then the mean of the two classes.
    ``"per-image"``: the mean of per-image values (mIoU per image averages the classes whose
    union is non-empty). AP is always the mean of per-image APs (their "mAP").
    """
    stats = stats.double()
    if stats.dim() != 2 or stats.shape[1] != 7:
        raise InputError(f"statistics: expected (N, 7) saliency-segmentation statistics, got {tuple(stats.shape)}")
    if averaging not in ("pooled", "per-image"):
        raise InputError(f"averaging: expected 'pooled' or 'per-image', got {averaging!r}")
    if stats.shape[0] == 0:
        return float("nan")
    if quantity == "ap" or averaging == "per-image":
        v = _per_image(stats, quantity)
        v = v[~torch.isnan(v)]
        return float(v.mean()) if v.numel() else float("nan")
    t = stats.sum(0)
    if quantity == "pixel-accuracy":
        return float(t[0] / t[1])
    if quantity == "miou":
        ious = torch.stack([t[2] / t[3], t[4] / t[5]])
        return float(ious.nanmean())
    raise InputError(f"quantity: expected one of {SEGMENTATION_QUANTITIES}, got {quantity!r}")


def saliency_segmentation(saliency: torch.Tensor, masks: torch.Tensor, averaging: str = "pooled") -> dict[str, float]:
    """``{"pixel_accuracy", "mAP", "mIoU"}`` of a batch (fractions in [0, 1]; Table 3 of the
    paper reports percent). See :func:`saliency_segmentation_statistics`."""
    stats = saliency_segmentation_statistics(saliency, masks)
    return {
        "pixel_accuracy": reduce_saliency_segmentation(stats, "pixel-accuracy", averaging),
        "mAP": reduce_saliency_segmentation(stats, "ap", averaging),
        "mIoU": reduce_saliency_segmentation(stats, "miou", averaging),
    }


# ---------------------------------------------------------------------------------------------
# Localisation
# ---------------------------------------------------------------------------------------------
class PointingGame(Metric):
    """Pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop", 2016;
    abs-cam.txt 4.3, eq. 6: ``Acc = #Hits / (#Hits + #Misses)``).

    ``compute(saliency (B, H, W), masks (B, H, W)) -> (B,)``: 1 if the map's maximum lies within
    ``tolerance`` pixels (Euclidean, inclusive) of a mask pixel, else 0; NaN (not counted, never
    a hit) for an empty mask. Equal maxima: the first in row-major order. Only the position of
    the maximum matters (invariant to strictly increasing transforms). Higher is better.
    """

    family = "localisation"

    class Config(ComponentConfig):
        tolerance: float = Field(15.0, ge=0, description="Hit tolerance in pixels at the map's resolution "
                                 "(Zhang et al.: 15).")

    def compute(self, saliency: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return pointing_game(saliency, masks, self.config.tolerance)


class SaliencySegmentation(PooledMetric):
    """Saliency maps as segmentations (Chefer et al. 2021; vit-lrp-affinitynet.txt 5.2, Table 3).

    Each map is min-max normalised and thresholded at its mean (foreground = map > mean); the
    chosen ``quantity`` is pixel accuracy, AP (both channels ``1 - map`` / ``map`` ranked
    together against the one-hot mask, scikit-learn's step-wise AP) or mIoU (mean of the
    background and foreground IoUs). Chefer et al. pool pixel accuracy and IoU counts over the
    dataset (``averaging="pooled"``, the default) and average AP per image ("mAP").
    ``compute(saliency, masks)`` gives per-image values (per-image mIoU averages the classes
    with a non-empty union). Higher is better; all in [0, 1].
    """

    family = "localisation"
    n_statistics = 7

    class Config(ComponentConfig):
        quantity: Literal["pixel-accuracy", "ap", "miou"] = Field(
            "miou", description="Which number: 'pixel-accuracy', 'ap' (its mean is mAP) or 'miou'.")
        averaging: Literal["pooled", "per-image"] = Field(
            "pooled", description="'pooled': sums of counts over images (Chefer et al.); 'per-image': mean of "
            "per-image values. AP is always averaged per image.")

    def compute(self, saliency: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        stats = self.statistics(saliency, masks)
        return _per_image(stats, self.config.quantity).to(float_dtype(saliency))

    def statistics(self, saliency: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return saliency_segmentation_statistics(saliency, masks)

    def reduce(self, statistics: torch.Tensor) -> float:
        return reduce_saliency_segmentation(statistics, self.config.quantity, self.config.averaging)
