"""Issue 15 item 6: mean-dice / mean-iou min-max normalise every non-constant prediction exactly,
as the PraNet / Polyp-PVT pipeline does (test script ``(res - min) / (max - min + 1e-8)``, then
the toolbox's ``mapminmax`` on what it reads back); a nearly saturated but correct prediction must
not score 0 (``normalize_maps``' relative tolerance used to zero it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from foveal import registry
from foveal.metrics.segmentation import exact_minmax, mean_dice_iou, threshold_curves


def reference_mean_dice_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """The protocol written out with numpy for one image: the test script's normalisation and the
    toolbox's second min-max, then 256 thresholds linspace(1, 0), foreground >= t, Dice/IoU 0
    where nothing overlaps."""
    res = (pred - pred.min()) / (pred.max() - pred.min() + 1e-8)
    res = (res - res.min()) / (res.max() - res.min())
    dice, iou = [], []
    for t in np.linspace(1, 0, 256):
        p = res >= t
        inter = (p & gt).sum()
        dice.append(0.0 if inter == 0 else 2 * inter / (p.sum() + gt.sum()))
        iou.append(0.0 if inter == 0 else inter / (p.sum() + gt.sum() - inter))
    return float(np.mean(dice)), float(np.mean(iou))


@pytest.mark.parametrize("low,dtype", [(0.99999, torch.float64), (0.9999, torch.float64), (0.999999, torch.float32)])
def test_nearly_saturated_correct_prediction_scores_high(low, dtype):
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[0, 4:12, 4:12] = True
    mask[1, 0:5, 3:14] = True
    pred = torch.where(mask, torch.tensor(1.0, dtype=dtype), torch.tensor(low, dtype=dtype))  # in [low, 1]
    summary = mean_dice_iou(pred, mask)
    assert summary["meanDice"] > 0.99 and summary["meanIoU"] > 0.99, summary
    for name in ("mean-dice", "mean-iou"):
        per_image = registry.build(name).compute(pred, mask)
        assert bool((per_image > 0.99).all()), (name, per_image)
    for i in range(2):
        d, j = reference_mean_dice_iou(pred[i].double().numpy(), mask[i].numpy())
        dice, iou = threshold_curves(pred[i : i + 1], mask[i : i + 1])
        assert abs(float(dice.mean()) - d) < 1e-12 and abs(float(iou.mean()) - j) < 1e-12
        assert abs(float(dice[0, 0]) - 1.0) < 1e-12  # threshold 1: exactly the region


def test_matches_reference_script_on_random_predictions():
    gen = torch.Generator().manual_seed(0)
    prob = torch.rand(3, 20, 20, generator=gen, dtype=torch.float64) * 0.3 + 0.5
    mask = torch.rand(3, 20, 20, generator=gen) > 0.6
    dice, iou = threshold_curves(prob, mask)
    for i in range(3):
        d, j = reference_mean_dice_iou(prob[i].numpy(), mask[i].numpy())
        assert abs(float(dice[i].mean()) - d) < 1e-12 and abs(float(iou[i].mean()) - j) < 1e-12


def test_constant_prediction_is_all_background():
    assert torch.equal(exact_minmax(torch.full((2, 5), 0.7, dtype=torch.float64)),
                       torch.zeros(2, 5, dtype=torch.float64))
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2] = True
    dice, _ = threshold_curves(torch.full((1, 4, 4), 0.7), mask)
    # all pixels are 0 after normalisation: foreground only at threshold 0 (the whole image)
    assert float(dice[0, -1]) == pytest.approx(2 * 8 / (16 + 8)) and float(dice[0, :-1].abs().max()) == 0.0
