"""PraNet / Polyp-PVT evaluation protocol: hand-computed cases and a loop re-derivation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from foveal.core.errors import InputError
from foveal.metrics.segmentation import dice_iou, mean_dice_iou, threshold_curves, thresholds


def reference_curves(prob: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """A literal loop over the reference protocol (min-max, linspace(1, 0, 256), p >= t, Dice =
    IoU = 0 when the intersection is empty), in float64."""
    p = prob.astype(np.float64)
    p = (p - p.min()) / (p.max() - p.min()) if p.max() > p.min() else np.zeros_like(p)
    rows = []
    for t in np.linspace(1, 0, 256):
        label = p >= t
        num_and = np.sum(label & gt)
        num_obj, num_pred = gt.sum(), label.sum()
        if num_and == 0:
            rows.append((0.0, 0.0))
        else:
            rows.append((2 * num_and / (num_obj + num_pred), num_and / (num_obj - num_and + num_pred)))
    return np.array(rows)


def test_hand_computed_2x2():
    # normalised values 0, 1/4, 1/2, 1; mask on the bottom row. Thresholds 1 - k/255:
    # k = 0..127 (128 thresholds): {1}          -> Dice 2/3, IoU 1/2
    # k = 128..191 (64):            {1, 1/2}     -> Dice 1,   IoU 1
    # k = 192..254 (63):            {1, 1/2, 1/4}-> Dice 4/5, IoU 2/3
    # k = 255 (t = 0):              all four     -> Dice 2/3, IoU 1/2
    prob = torch.tensor([[[0.0, 0.25], [0.5, 1.0]]])
    mask = torch.tensor([[[False, False], [True, True]]])
    dice, iou = threshold_curves(prob, mask)
    assert dice.shape == (1, 256)
    assert dice[0, 0] == pytest.approx(2 / 3) and dice[0, 127] == pytest.approx(2 / 3)
    assert dice[0, 128] == 1.0 and dice[0, 191] == 1.0 and dice[0, 192] == pytest.approx(0.8)
    assert dice[0, 255] == pytest.approx(2 / 3) and iou[0, 200] == pytest.approx(2 / 3)
    mean_dice = (128 * 2 / 3 + 64 * 1 + 63 * 0.8 + 2 / 3) / 256
    mean_iou = (128 * 0.5 + 64 * 1 + 63 * 2 / 3 + 0.5) / 256
    out = mean_dice_iou(prob, mask)
    assert out["meanDice"] == pytest.approx(mean_dice, abs=1e-12)
    assert out["meanIoU"] == pytest.approx(mean_iou, abs=1e-12)
    # at 0.5 on the raw probability: {1/2, 1} = the mask
    assert out["dice@0.5"] == 1.0 and out["iou@0.5"] == 1.0 and out["num_images"] == 1


def test_min_max_normalisation_is_per_image():
    prob = torch.tensor([[[0.0, 0.25], [0.5, 1.0]]])
    mask = torch.tensor([[[False, False], [True, True]]])
    scaled = 0.3 + 0.2 * prob  # same ranking, different range: identical curves after min-max
    for a, b in zip(threshold_curves(prob, mask), threshold_curves(scaled, mask)):
        torch.testing.assert_close(a, b)
    # without normalisation, all values are below most thresholds
    d_raw, _ = threshold_curves(scaled, mask, normalize=False)
    assert d_raw[0, :100].eq(0).all()


def test_matches_reference_loop_on_random_maps():
    g = torch.Generator().manual_seed(0)
    prob = torch.rand(4, 23, 17, generator=g)
    prob[1] = (prob[1] * 255).round() / 255  # 8-bit values sit exactly on thresholds
    mask = torch.rand(4, 23, 17, generator=g) > 0.6
    mask[2] = False
    dice, iou = threshold_curves(prob, mask)
    for b in range(4):
        ref = reference_curves(prob[b].numpy(), mask[b].numpy())
        np.testing.assert_allclose(dice[b].numpy(), ref[:, 0], atol=1e-12)
        np.testing.assert_allclose(iou[b].numpy(), ref[:, 1], atol=1e-12)


def test_empty_cases_follow_the_reference():
    empty = torch.zeros(1, 4, 4, dtype=torch.bool)
    # constant prediction -> normalised to 0 -> foreground only at t = 0; empty mask -> all 0
    dice, iou = threshold_curves(torch.full((1, 4, 4), 0.7), empty)
    assert dice.eq(0).all() and iou.eq(0).all()
    # dice_iou lets the caller choose: empty/empty = 1 by default, NaN to skip
    d, i = dice_iou(empty, empty)
    assert d.item() == 1.0 and i.item() == 1.0
    d, _ = dice_iou(empty, empty, empty_value=float("nan"))
    assert torch.isnan(d).all()
    full = torch.ones(1, 4, 4, dtype=torch.bool)
    d, i = dice_iou(empty, full)
    assert d.item() == 0.0 and i.item() == 0.0


def test_dice_iou_hand_case():
    pred = torch.tensor([[[1, 1, 0], [0, 0, 0]], [[1, 1, 1], [1, 1, 1]]]).bool()
    mask = torch.tensor([[[1, 0, 0], [1, 0, 0]], [[1, 1, 1], [1, 1, 1]]]).bool()
    d, i = dice_iou(pred, mask)
    torch.testing.assert_close(d, torch.tensor([0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(i, torch.tensor([1 / 3, 1.0], dtype=torch.float64))
    # Dice = 2 IoU / (1 + IoU)
    torch.testing.assert_close(d, 2 * i / (1 + i))


def test_dataset_mean_is_over_images_then_thresholds():
    g = torch.Generator().manual_seed(1)
    prob, mask = torch.rand(3, 8, 8, generator=g), torch.rand(3, 8, 8, generator=g) > 0.5
    dice, _ = threshold_curves(prob, mask)
    assert mean_dice_iou(prob, mask)["meanDice"] == pytest.approx(float(dice.mean(0).mean()))
    assert float(dice.mean(0).mean()) == pytest.approx(float(dice.mean(1).mean()))


def test_thresholds_are_numpy_linspace():
    t = thresholds(256)
    assert t[0] == 1.0 and t[-1] == 0.0 and torch.equal(t, torch.from_numpy(np.linspace(1, 0, 256)))


def test_bad_inputs():
    with pytest.raises(InputError, match="same"):
        threshold_curves(torch.rand(1, 4, 4), torch.zeros(1, 4, 5, dtype=torch.bool))
    with pytest.raises(InputError, match="binary"):
        dice_iou(torch.rand(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool))
