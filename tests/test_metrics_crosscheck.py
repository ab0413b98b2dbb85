"""Metrics against independent references: torchcam, scikit-learn, scikit-image, scipy, the
PraNet mean-Dice protocol and Chefer et al.'s segmentation test on hand-computed cases, plus the
model-randomisation sanity check."""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from foveal import registry
from foveal.metrics import explanation as E
from foveal.metrics import localisation as L
from foveal.metrics import sanity as S


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 5, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


class FixedCAM:
    """A torchcam ``_CAMExtractor`` returning given maps, so that both libraries score the same maps."""

    def __init__(self, model: nn.Module, maps: torch.Tensor) -> None:
        self.model, self.maps = model, maps

    def __call__(self, class_idx=None, scores=None, normalized=True, *, targets=None, **kwargs):
        return [self.maps]

    def fuse_cams(self, cams):
        return cams[0]

    @contextmanager
    def _hooks_off(self):
        yield


def _data(seed=0, b=3, h=10, w=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, h, w, generator=g)
    s = torch.rand(b, h, w, generator=g)
    s = (s - s.flatten(1).min(1).values[:, None, None]) / (s.flatten(1).max(1).values - s.flatten(1).min(1).values)[
        :, None, None]  # already min-max normalised: torchcam uses the map as given
    return x, s


# ---------------------------------------------------------------------------------------------
# torchcam
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_drop_and_increase_match_torchcam(seed):
    from torchcam.metrics import ClassificationMetric

    model = TinyCNN(seed=seed)
    x, s = _data(seed)
    ref = ClassificationMetric(FixedCAM(model, s), partial(torch.softmax, dim=-1))
    ref.update(x)
    out = ref.summary()
    drop, inc = registry.build("average-drop"), registry.build("average-increase")
    assert math.isclose(drop.aggregate(drop(model, x, s)) / 100, out["avg_drop"], rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(inc.aggregate(inc(model, x, s)) / 100, out["conf_increase"], abs_tol=1e-12)


@pytest.mark.parametrize("steps", [7, 20, 100])
def test_insertion_deletion_match_torchcam(steps):
    """torchcam's conventions = ours with baseline 'zero' for both curves and the 'fraction' x axis
    (10 x 10 pixels: 7 steps do not divide them, so the fraction axis matters)."""
    from torchcam.metrics import DeletionInsertionMetric

    model = TinyCNN(seed=3)
    x, s = _data(3)
    s = torch.round(s * 5) / 5  # ties: both sort stably, most salient first, then row-major
    ref = DeletionInsertionMetric(FixedCAM(model, s), partial(torch.softmax, dim=-1), steps=steps, batch_size=16)
    ref.update(x)
    out = ref.summary()
    dele = registry.build("deletion", steps=steps, baseline="zero", x_axis="fraction")(model, x, s)
    ins = registry.build("insertion", steps=steps, baseline="zero", x_axis="fraction")(model, x, s)
    assert math.isclose(float(dele.mean()), out["deletion_auc"], rel_tol=1e-5)
    assert math.isclose(float(ins.mean()), out["insertion_auc"], rel_tol=1e-5)
    if 100 % steps == 0:  # equal spacing: RISE's step axis agrees
        step = registry.build("deletion", steps=steps, baseline="zero")(model, x, s)
        torch.testing.assert_close(step, dele)


def test_rise_auc_formula_and_blur_kernel():
    curve = torch.tensor([[0.9, 0.5, 0.4, 0.1, 0.0]])
    rise = (curve.sum() - curve[0, 0] / 2 - curve[0, -1] / 2) / (curve.shape[1] - 1)
    torch.testing.assert_close(E.curve_auc(curve, torch.linspace(0, 1, 5))[0], rise)
    from scipy.ndimage import gaussian_filter

    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    kern = gaussian_filter(delta, 5)  # RISE's gkern(11, 5)
    img = torch.zeros(1, 3, 11, 11, dtype=torch.float64)
    img[:, :, 5, 5] = 1
    torch.testing.assert_close(E.rise_blur(img)[0, 1], torch.from_numpy(kern), rtol=0, atol=1e-12)
    assert math.isclose(kern.sum(), 1.0, rel_tol=1e-12)


def test_deletion_curve_by_hand():
    """2 x 2 image, 4 steps: deletion removes the pixels in saliency order and scores each image."""
    model = TinyCNN(seed=4)
    x = torch.randn(1, 3, 2, 2)
    s = torch.tensor([[[0.2, 0.9], [0.9, 0.1]]])  # order: (0,1), (1,0) [tie, row-major], (0,0), (1,1)
    f, c = E.deletion_curve(model, x, s, steps=4)
    cls = int(model(x).argmax())
    expected = []
    for removed in ([], [(0, 1)], [(0, 1), (1, 0)], [(0, 1), (1, 0), (0, 0)], [(0, 1), (1, 0), (0, 0), (1, 1)]):
        xi = x.clone()
        for i, j in removed:
            xi[0, :, i, j] = 0
        expected.append(float(torch.softmax(model(xi), 1)[0, cls].detach()))
    torch.testing.assert_close(c[0], torch.tensor(expected), rtol=1e-6, atol=1e-7)
    assert f.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_perturbation_auc_by_hand():
    """Chefer et al.: black out floor(f*N) pixels per fraction, top-1 correctness, np.trapz."""
    model = TinyCNN(seed=5)
    x, s = _data(5, b=2, h=6, w=6)
    mean, std = torch.tensor(E.IMAGENET_MEAN)[:, None, None], torch.tensor(E.IMAGENET_STD)[:, None, None]
    fr = E.CHEFER_FRACTIONS
    for mode in ("positive", "negative"):
        got = registry.build("perturbation-auc", mode=mode)(model, x, s)
        for i in range(2):
            cls = int(model(x[i : i + 1]).argmax())
            order = np.argsort(-s[i].flatten().numpy() if mode == "positive" else s[i].flatten().numpy(),
                               kind="stable")
            acc = []
            for f in fr:
                k = int(math.floor(f * 36 + 1e-9))
                pix = x[i] * std + mean  # back to [0, 1] pixels, zero, normalise again
                flat = pix.reshape(3, -1).clone()
                flat[:, order[:k]] = 0
                xi = ((flat.reshape(3, 6, 6) - mean) / std)[None]
                acc.append(float(model(xi).argmax() == cls))
            assert math.isclose(float(got[i]), float(np.trapezoid(acc, fr)), abs_tol=1e-6)


# ---------------------------------------------------------------------------------------------
# PraNet mean Dice (hand-computed), Dice/IoU
# ---------------------------------------------------------------------------------------------
def test_pranet_mean_dice_hand_case():
    """Thresholds linspace(1, 0, 256) = i/255, foreground p >= t. With p = [0, .5, 1, 1], G = [0, 0, 1, 1]:
    t = 0 -> 4 px (Dice 2*2/6); 0 < t <= .5 (i = 1..127) -> 3 px (Dice 4/5); t > .5 (128 values) -> 2 px (1)."""
    p = torch.tensor([[[0.0, 0.5, 1.0, 1.0]]])
    g = torch.tensor([[[False, False, True, True]]])
    dice = (2 / 3 + 127 * 0.8 + 128 * 1.0) / 256
    iou = (2 / 4 + 127 * (2 / 3) + 128 * 1.0) / 256
    assert math.isclose(float(registry.build("mean-dice")(p, g)), dice, rel_tol=1e-6)
    assert math.isclose(float(registry.build("mean-iou")(p, g)), iou, rel_tol=1e-6)
    # min-max normalisation first: an affine copy scores the same
    assert math.isclose(float(registry.build("mean-dice")(p * 0.4 + 0.3, g)), dice, rel_tol=1e-6)
    # empty prediction on an empty mask: 0 in PraNet's toolbox, 1 (empty_value) for plain dice
    zero = torch.zeros(1, 1, 4)
    none = torch.zeros(1, 1, 4, dtype=torch.bool)
    assert float(registry.build("mean-dice")(zero, none)) == 0.0
    assert float(registry.build("dice")(zero, none)) == 1.0


def test_dice_iou_hand_case_and_pooling():
    pred = torch.tensor([[[0.9, 0.6, 0.2, 0.0]], [[0.7, 0.1, 0.0, 0.0]]])
    gt = torch.tensor([[[True, False, True, False]], [[True, True, True, True]]])
    # image 1: P = {0, 1}, G = {0, 2}: I = 1 -> Dice 2/4, IoU 1/3; image 2: P = {0}, |G| = 4 -> Dice 2/5, IoU 1/4
    torch.testing.assert_close(registry.build("dice")(pred, gt), torch.tensor([0.5, 0.4]))
    torch.testing.assert_close(registry.build("iou")(pred, gt), torch.tensor([1 / 3, 0.25]))
    pooled = registry.build("dice", averaging="pooled")
    assert math.isclose(pooled.score(pred, gt), 2 * 2 / (3 + 6))
    assert math.isclose(registry.build("iou", averaging="pooled").score(pred, gt), 2 / (3 + 6 - 2))
    assert math.isclose(registry.build("dice", threshold=0.65)(pred, gt)[0].item(), 2 / 3, rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------
# Pointing game and saliency segmentation (hand cases and Chefer et al.'s code as reference)
# ---------------------------------------------------------------------------------------------
def test_pointing_game_hand_cases():
    mask = torch.zeros(3, 30, 30, dtype=torch.bool)
    mask[:, 0, 0] = True
    s = torch.zeros(3, 30, 30)
    s[0, 9, 12] = 1  # distance 15 exactly: hit (inclusive)
    s[1, 10, 12] = 1  # distance sqrt(244) > 15: miss
    s[2] = 0.5  # constant map: the first pixel in row-major order, (0, 0): hit
    assert L.pointing_game(s, mask).tolist() == [1.0, 0.0, 1.0]
    assert L.pointing_game(s, mask, tolerance=0).tolist() == [0.0, 0.0, 1.0]
    s2 = torch.zeros(1, 4, 4)
    s2[0, 1, 1] = s2[0, 3, 3] = 1  # tie: (1, 1) comes first
    m2 = torch.zeros(1, 4, 4, dtype=torch.bool)
    m2[0, 3, 3] = True
    assert L.pointing_game(s2, m2, tolerance=1).tolist() == [0.0]
    assert L.pointing_game(s2, m2, tolerance=3).tolist() == [1.0]
    agg = registry.build("pointing-game")
    v = agg(torch.rand(2, 5, 5), torch.zeros(2, 5, 5, dtype=torch.bool))
    assert bool(torch.isnan(v).all()) and math.isnan(agg.aggregate(v))


def _chefer_reference(saliency: np.ndarray, labels: np.ndarray):
    """Re-derivation of Chefer et al.'s imagenet_seg_eval.py for a batch of images (numpy + sklearn)."""
    from sklearn.metrics import average_precision_score

    tc = tl = 0
    ti = np.zeros(2)
    tu = np.zeros(2)
    aps = []
    for res, lab in zip(saliency, labels):
        res = (res - res.min()) / (res.max() - res.min())
        ret = res.mean()
        out = np.stack([(res <= ret).astype(float), (res > ret).astype(float)])
        pred = out.argmax(0) + 1
        tgt = lab.astype(int) + 1
        tc += np.sum((pred == tgt) * (tgt > 0))
        tl += np.sum(tgt > 0)
        pred = pred * (tgt > 0)
        inter = pred * (pred == tgt)
        ai, _ = np.histogram(inter, bins=2, range=(1, 2))
        ap_, _ = np.histogram(pred, bins=2, range=(1, 2))
        al, _ = np.histogram(tgt, bins=2, range=(1, 2))
        ti += ai
        tu += ap_ + al - ai
        onehot = np.stack([1 - lab, lab]).astype(int)
        aps.append(average_precision_score(onehot.reshape(-1), np.stack([1 - res, res]).reshape(-1)))
    return tc / tl, float(np.mean(aps)), float(np.mean(ti / tu))


@pytest.mark.parametrize("seed", [0, 1])
def test_saliency_segmentation_matches_chefer_code(seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(4, 12, 12, generator=g) ** 2
    s[1] = torch.round(s[1] * 4)  # ties
    masks = torch.zeros(4, 12, 12, dtype=torch.bool)
    masks[:, 3:9, 2:7] = True
    masks[2, :, :] = torch.rand(12, 12, generator=g) < 0.5
    acc, m_ap, miou = _chefer_reference(s.double().numpy(), masks.numpy())
    got = L.saliency_segmentation(s, masks)
    assert math.isclose(got["pixel_accuracy"], acc, rel_tol=1e-12)
    assert math.isclose(got["mAP"], m_ap, rel_tol=1e-9)
    assert math.isclose(got["mIoU"], miou, rel_tol=1e-12)
    comp = registry.build("saliency-segmentation", quantity="miou")
    stats = torch.cat([comp.statistics(s[:2], masks[:2]), comp.statistics(s[2:], masks[2:])])
    assert math.isclose(comp.aggregate(stats), miou, rel_tol=1e-12), "pooled over batches"


# ---------------------------------------------------------------------------------------------
# Sanity check (Adebayo et al.)
# ---------------------------------------------------------------------------------------------
def test_spearman_and_ssim_match_scipy_and_skimage():
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (3, 16, 16), generator=g).float()
    b = torch.rand(3, 16, 16, generator=g)
    ref = [spearmanr(a[i].flatten(), b[i].flatten()).statistic for i in range(3)]
    torch.testing.assert_close(S.spearman(a, b), torch.tensor(ref, dtype=torch.float64))
    b = (a / 4 + 0.2 * b).clamp(0, 1)
    a = a / 4
    ref = [structural_similarity(a[i].double().numpy(), b[i].double().numpy(), data_range=1.0) for i in range(3)]
    torch.testing.assert_close(S.ssim(a, b), torch.tensor(ref, dtype=torch.float64))
    assert math.isnan(float(S.spearman(torch.ones(1, 9), torch.rand(1, 9))[0]))


class GradientMap:
    """Gradient x input saliency (|d y_c / d x| summed over channels): a gradient explainer."""

    def explain(self, model, images, targets=None):
        x = images.detach().clone().requires_grad_(True)
        out = model(x)
        cls = torch.as_tensor(targets) if targets is not None else out.argmax(1)
        (g,) = torch.autograd.grad(out.gather(1, cls[:, None]).sum(), x)
        m = g.abs().sum(1)
        return (m - m.amin((1, 2), keepdim=True)) / (m.amax((1, 2), keepdim=True) - m.amin((1, 2), keepdim=True))


@pytest.mark.parametrize("explainer", ["grad-cam", "gradient"])
def test_cascading_randomisation_decorrelates_maps(explainer, tmp_path):
    model = TinyCNN(seed=6)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    exp = registry.build("grad-cam", target_layer="conv2") if explainer == "grad-cam" else GradientMap()
    rng = torch.get_rng_state()
    table = S.model_randomisation(model, exp, x, seed=1)
    assert torch.equal(torch.get_rng_state(), rng), "the caller's RNG stream is untouched"
    again = S.model_randomisation(model, exp, x, seed=1)
    assert again.rows == table.rows, "seeded: reproducible"
    layers = S.randomisable_layers(model)
    assert layers == ["fc", "conv2", "conv1"]
    casc = [r for r in table.rows if r["mode"] == "cascading"]
    ind = [r for r in table.rows if r["mode"] == "independent"]
    assert len(casc) == len(ind) == 1 + len(layers)
    assert casc[0]["spearman"] == pytest.approx(1.0) and casc[0]["ssim"] == pytest.approx(1.0)
    assert casc[-1]["spearman"] < 0.5 and casc[-1]["ssim"] < 0.6, table.to_markdown()
    assert all(r["spearman"] < 0.99 for r in casc[1:] + ind[1:]), table.to_markdown()
    # independent randomisation of a layer equals the first cascading step for the top layer
    assert ind[1]["spearman"] == pytest.approx(casc[1]["spearman"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "model untouched"
    assert model.training
    png = S.plot_randomisation(table, tmp_path / "sanity.png", title=explainer)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| cascading | 3 | `conv1` |" in table.to_markdown()


def test_a_model_independent_map_fails_the_sanity_check():
    """An edge detector ignores the model: its maps do not change when layers are randomised."""

    class Edges:
        def explain(self, model, images, targets=None):
            m = (images[:, :, 1:, :] - images[:, :, :-1, :]).abs().sum(1)
            m = torch.nn.functional.pad(m, (0, 0, 0, 1))
            return m / m.amax((1, 2), keepdim=True)

    table = S.model_randomisation(TinyCNN(seed=7), Edges(), torch.randn(2, 3, 12, 12), modes=("cascading",))
    assert all(r["spearman"] == pytest.approx(1.0) for r in table.rows)
