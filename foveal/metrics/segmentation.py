"""Functional segmentation metrics: per-image Dice/IoU and the polyp-benchmark protocol.

The polyp literature (PraNet, Polyp-PVT, CaraNet, RTA-Former Table II) reports *meanDice* and
*meanIoU* computed by the PraNet evaluation toolbox (MATLAB ``Eval/main.m`` with
``Fmeasure_calu.m``; the Python ports in the Polyp-PVT/UACANet repositories follow it):

1. the prediction (sigmoid probability, resized to the mask) is min-max normalised per image,
   exactly (:func:`exact_minmax`): ``(p - min) / (max - min)`` for every non-constant map,
   however small its spread, and all zeros for a constant map. The reference normalises twice:
   the PraNet / Polyp-PVT test scripts save ``(res - res.min()) / (res.max() - res.min() + 1e-8)``
   and the toolbox stretches what it reads back (``mapminmax``) to [0, 1] again, so the maximum
   is exactly 1 and a nearly saturated prediction (values in [0.99999, 1]) still separates its
   region. (The explainers' ``normalize_maps`` instead zeroes maps whose spread is below a
   relative tolerance, right for float noise in saliency maps, wrong for this protocol.)
2. thresholds ``numpy.linspace(1, 0, 256)`` (MATLAB ``1:-1/255:0``): 1, 254/255, ..., 0, in that
   (descending) order; a pixel is foreground when ``p >= threshold``;
3. per image and threshold: ``Dice = 2|P&G| / (|P| + |G|)``, ``IoU = |P&G| / (|G| - |P&G| + |P|)``,
   and **both are 0 whenever |P&G| = 0**, including an empty prediction on an empty mask;
4. meanDice = mean over thresholds of the mean over images (the same number as the mean over
   images of each image's mean over thresholds).

Differences from the reference, on purpose: the reference reads predictions back from 8-bit PNG
files (so they are quantised to multiples of 1/255 before normalisation); here the float
prediction is used directly, in float64. Results agree except for pixels whose value lies
within 1/255 of a threshold. :func:`dice_iou` (binary masks, e.g. at threshold 0.5) lets the
caller choose the value for the empty/empty case (``empty_value``, default 1: a correct "no
polyp" answer), unlike step 3.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from ..core.config import ComponentConfig
from ..core.errors import InputError
from ..core.metric import Metric, PooledMetric
from ..core.tensors import check_maps, check_masks, float_dtype


def _pair(pred: torch.Tensor, mask: torch.Tensor, pred_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    mask = check_masks(mask, name="mask")
    if tuple(pred.shape) != tuple(mask.shape):
        raise InputError(f"{pred_name} {tuple(pred.shape)} and mask {tuple(mask.shape)} must have the same (B, H, W)")
    return pred, mask.to(pred.device)


def dice_iou(pred: torch.Tensor, mask: torch.Tensor, empty_value: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice ``2|P&G|/(|P|+|G|)`` and IoU ``|P&G|/|P|G|`` of binary (B, H, W) masks.

    An image whose prediction and mask are both empty gets ``empty_value`` for both (NaN to leave
    it out of averages); when only one is empty the scores are 0. Returns two float64 (B,)."""
    pred = check_masks(pred, name="pred")
    pred, mask = _pair(pred, mask, "pred")
    p, g = pred.flatten(1), mask.flatten(1)
    inter = (p & g).sum(1).double()
    sp, sg = p.sum(1).double(), g.sum(1).double()
    union = sp + sg - inter
    empty = (sp + sg) == 0
    fill = torch.full_like(inter, float(empty_value))
    dice = torch.where(empty, fill, 2 * inter / (sp + sg).clamp_min(1))
    iou = torch.where(empty, fill, inter / union.clamp_min(1))
    return dice, iou


def exact_minmax(p: torch.Tensor) -> torch.Tensor:
    """Per-row min-max of (B, N) predictions without any tolerance (module docstring, step 1):
    ``(p - min) / (max - min)`` when ``max > min``, zeros for a constant row."""
    lo, hi = p.amin(1, keepdim=True), p.amax(1, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (p - lo) / torch.where(span > 0, span, 1), 0.0)


def thresholds(num_thresholds: int = 256) -> torch.Tensor:
    """The reference thresholds ``numpy.linspace(1, 0, num_thresholds)`` as float64 (descending)."""
    if num_thresholds < 2:
        raise InputError(f"num_thresholds must be >= 2, got {num_thresholds}")
    return torch.from_numpy(np.linspace(1.0, 0.0, num_thresholds))


def threshold_curves(
    prob: torch.Tensor, mask: torch.Tensor, num_thresholds: int = 256, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice and IoU at every threshold of the PraNet protocol (module docstring,
    steps 1-3): ``prob`` float (B, H, W), ``mask`` bool (B, H, W); returns two float64 (B, T)
    tensors, column t for threshold ``thresholds(T)[t]`` (descending from 1 to 0).
    ``normalize=False`` skips the per-image min-max normalisation."""
    prob = check_maps(prob, name="prob")
    prob, mask = _pair(prob, mask, "prob")
    p = prob.detach().double().flatten(1)
    if normalize:
        p = exact_minmax(p)
    thr = thresholds(num_thresholds).to(p.device)
    ascending = thr.flip(0).contiguous()
    # number of thresholds each pixel reaches: pixel is foreground at ascending[j] iff j < m
    m = torch.searchsorted(ascending, p.contiguous(), right=True)
    b, t = p.shape[0], num_thresholds
    g = mask.flatten(1).double()
    hist_all = torch.zeros(b, t + 1, dtype=torch.float64, device=p.device).scatter_add_(1, m, torch.ones_like(p))
    hist_fg = torch.zeros(b, t + 1, dtype=torch.float64, device=p.device).scatter_add_(1, m, g)
    # |P| at ascending[j] = pixels with m > j; reversed to the descending threshold order
    num_pred = hist_all.flip(1).cumsum(1)[:, :t]
    num_and = hist_fg.flip(1).cumsum(1)[:, :t]
    num_obj = g.sum(1, keepdim=True)
    hit = num_and > 0
    dice = torch.where(hit, 2 * num_and / (num_obj + num_pred).clamp_min(1), torch.zeros_like(num_and))
    iou = torch.where(hit, num_and / (num_obj - num_and + num_pred).clamp_min(1), torch.zeros_like(num_and))
    return dice, iou


def mean_dice_iou(prob: torch.Tensor, mask: torch.Tensor, num_thresholds: int = 256) -> dict[str, float]:
    """Dataset summary of ``prob`` (B, H, W) against ``mask`` (B, H, W):

    * ``meanDice``, ``meanIoU``: the polyp-benchmark protocol (module docstring), i.e. the
      :func:`threshold_curves` averaged over images, then over thresholds;
    * ``dice@0.5``, ``iou@0.5``: mean over images of :func:`dice_iou` on the *raw* probability
      ``prob >= 0.5`` (no normalisation; empty/empty counts as 1);
    * ``num_images``.

    For a dataset evaluated in batches, concatenate the per-image curves instead (see
    :func:`summarize_curves`)."""
    dice_c, iou_c = threshold_curves(prob, mask, num_thresholds)
    d05, i05 = dice_iou(check_maps(prob, name="prob") >= 0.5, mask)
    return summarize_curves(dice_c, iou_c, d05, i05)


def summarize_curves(
    dice_curves: torch.Tensor, iou_curves: torch.Tensor, dice05: torch.Tensor, iou05: torch.Tensor
) -> dict[str, float]:
    """Combine per-image curves (N, T) and per-image scores at 0.5 (N,) into the summary dict of
    :func:`mean_dice_iou`."""
    return {
        "meanDice": float(dice_curves.mean(0).mean()),
        "meanIoU": float(iou_curves.mean(0).mean()),
        "dice@0.5": float(dice05.double().mean()),
        "iou@0.5": float(iou05.double().mean()),
        "num_images": int(dice_curves.shape[0]),
    }


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------
def _as_prob(predictions: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    masks = check_masks(masks)
    if not isinstance(predictions, torch.Tensor):
        raise InputError(f"predictions: expected a torch.Tensor, got {type(predictions).__name__}")
    if predictions.dim() == 4 and predictions.shape[1] == 1:
        predictions = predictions[:, 0]
    if predictions.shape != masks.shape:
        raise InputError(f"predictions: expected shape {tuple(masks.shape)} to match the masks, got "
                         f"{tuple(predictions.shape)}")
    if predictions.dtype != torch.bool:
        if not predictions.is_floating_point():
            predictions = predictions.float()
        if not bool(torch.isfinite(predictions).all()):
            raise InputError("predictions: expected finite values")
    return predictions, masks.to(predictions.device)


def _check_probabilities(predictions: torch.Tensor) -> None:
    """Thresholds and curves read probabilities: logits would be scored silently wrong."""
    if predictions.dtype != torch.bool and predictions.numel():
        lo, hi = torch.aminmax(predictions)
        if float(lo) < 0 or float(hi) > 1:
            raise InputError(f"predictions: expected probabilities in [0, 1] or bool (apply a sigmoid to logits), "
                             f"got values in [{float(lo):.4g}, {float(hi):.4g}]")


class _OverlapConfig(ComponentConfig):
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="Probabilities >= threshold are foreground "
                             "(bool predictions are used as they are).")
    empty_value: float = Field(1.0, description="Value when prediction and mask are both empty (per image; "
                               "pooled: when all are empty). 1.0: a correct empty prediction; NaN: not counted.")
    averaging: Literal["per-image", "pooled"] = Field(
        "per-image", description="'per-image': mean of per-image scores (PraNet / Polyp-PVT / RTA-Former); "
        "'pooled': one score from intersections and sizes summed over all images.")

    @field_validator("empty_value")
    @classmethod
    def _empty_in_range(cls, v: float) -> float:
        if not (v != v or 0.0 <= v <= 1.0):
            raise ValueError(f"empty_value must be in [0, 1] or NaN, got {v}")
        return v


class _Overlap(PooledMetric):
    family = "segmentation"
    n_statistics = 3
    Config = _OverlapConfig
    _index: ClassVar[int] = 0

    def _binary(self, predictions: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pred, masks = _as_prob(predictions, masks)
        _check_probabilities(pred)
        return (pred if pred.dtype == torch.bool else pred >= self.config.threshold), masks

    def compute(self, predictions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        pred, gt = self._binary(predictions, masks)
        values = dice_iou(pred, gt, empty_value=self.config.empty_value)[self._index]
        return values.to(float_dtype(predictions))

    def statistics(self, predictions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(B, 3) float64: intersection, predicted area, mask area."""
        pred, gt = self._binary(predictions, masks)
        return torch.stack([(pred & gt).flatten(1).sum(1), pred.flatten(1).sum(1), gt.flatten(1).sum(1)], 1).double()


class Dice(_Overlap):
    """Dice similarity coefficient ``2|P n G| / (|P| + |G|)`` (rta-former.txt III.B "DICE").

    ``compute(predictions (B, H, W) probabilities or bool, masks (B, H, W)) -> (B,)``, the
    prediction binarised at ``threshold`` (>=). Both empty: ``empty_value``. ``averaging``:
    per-image mean (the polyp literature) or pooled over images (``aggregate`` of the
    statistics). For the 256-threshold protocol use ``mean-dice``. Higher is better.
    """

    _index = 0

    def reduce(self, statistics: torch.Tensor) -> float:
        s = statistics.double()
        if self.config.averaging == "per-image":
            den = s[:, 1] + s[:, 2]
            v = torch.where(den > 0, 2 * s[:, 0] / den.clamp_min(1), torch.full_like(den, self.config.empty_value))
            v = v[~torch.isnan(v)]
            return float(v.mean()) if v.numel() else float("nan")
        t = s.sum(0)
        den = t[1] + t[2]
        return float(2 * t[0] / den) if den > 0 else float(self.config.empty_value)


class IoU(_Overlap):
    """Intersection over union ``|P n G| / |P u G|`` (Jaccard index; rta-former.txt III.B).

    Same conventions as ``dice`` (threshold >=, ``empty_value`` for empty/empty, per-image or
    pooled averaging). Per image ``Dice = 2 IoU / (1 + IoU)``. Higher is better.
    """

    _index = 1

    def reduce(self, statistics: torch.Tensor) -> float:
        s = statistics.double()
        if self.config.averaging == "per-image":
            den = s[:, 1] + s[:, 2] - s[:, 0]
            v = torch.where(den > 0, s[:, 0] / den.clamp_min(1), torch.full_like(den, self.config.empty_value))
            v = v[~torch.isnan(v)]
            return float(v.mean()) if v.numel() else float("nan")
        t = s.sum(0)
        den = t[1] + t[2] - t[0]
        return float(t[0] / den) if den > 0 else float(self.config.empty_value)


class _MeanConfig(ComponentConfig):
    num_thresholds: int = Field(256, ge=2, description="Thresholds evenly spaced on [0, 1] (PraNet: 256, "
                                "1:-1/255:0 in the MATLAB evaluation).")
    normalize: bool = Field(True, description="Min-max normalise each prediction first, exactly (any non-zero "
                            "spread is stretched to [0, 1], as the PraNet / Polyp-PVT pipeline).")


class _MeanOverlap(Metric):
    family = "segmentation"
    Config = _MeanConfig
    _index: ClassVar[int] = 0

    def compute(self, predictions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        prob, gt = _as_prob(predictions, masks)
        if not self.config.normalize:
            _check_probabilities(prob)
        prob = prob.to(float_dtype(prob))
        curves = threshold_curves(prob, gt, num_thresholds=self.config.num_thresholds,
                                         normalize=self.config.normalize)[self._index]
        return curves.mean(1).to(prob.dtype)


class MeanDice(_MeanOverlap):
    """Mean Dice of the polyp-segmentation literature (PraNet, Polyp-PVT; rta-former.txt III.B).

    Per image: Dice at each of ``num_thresholds`` thresholds of the exactly min-max normalised
    prediction (no tolerance: a nearly saturated but correct prediction still scores high, as in
    the PraNet / Polyp-PVT pipeline), averaged over thresholds; the
    dataset value is the mean over images (per-image averaging only: the protocol averages
    per-image curves). Thresholds ``linspace(1, 0, T)``, foreground ``p >= t``; as in PraNet's
    toolbox a threshold where
    prediction and mask do not overlap scores 0, also when both are empty (see
    :mod:`foveal.metrics.segmentation`). Higher is better.
    """

    _index = 0


class MeanIoU(_MeanOverlap):
    """Mean IoU of the polyp-segmentation literature ("mIoU" in PraNet / RTA-Former tables):
    IoU averaged over ``num_thresholds`` thresholds per image, then over images (the foreground
    IoU, not a mean over classes). Higher is better."""

    _index = 1
