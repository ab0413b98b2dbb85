"""Property-based tests of the metric invariants (hypothesis; tiny images, tiny models)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch import nn

from foveal import registry
from foveal.core.errors import InputError
from foveal.metrics import explanation as E
from foveal.metrics import localisation as L

FAST = settings(max_examples=30, deadline=None)
SLOW = settings(max_examples=20, deadline=None)  # examples that run many model forwards


# ---------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------
class TinyCNN(nn.Module):
    def __init__(self, classes: int = 4, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class RegionModel(nn.Module):
    """Two classes; logit of class 1 = 4 * mean of channel 0 over a known region R, class 0 = 0."""

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("region", region.float())
        self.scale = nn.Parameter(torch.tensor(4.0))

    def forward(self, x):
        s = (x[:, 0] * self.region).flatten(1).sum(1) / self.region.sum()
        return torch.stack([torch.zeros_like(s), self.scale * s], 1)


class ConstantModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([0.3, -1.0, 2.0]))

    def forward(self, x):
        return self.logits.expand(x.shape[0], 3) + 0 * x.sum()


def images_and_maps(seed: int, b: int, h: int, w: int, levels: int | None = None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, h, w, generator=g)
    if levels is None:
        s = torch.rand(b, h, w, generator=g)
    else:  # few distinct values: many ties
        s = torch.randint(0, levels, (b, h, w), generator=g).float()
    return x, s


shapes = st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(6, 12), st.integers(6, 12))
MODEL = TinyCNN()

PERCENT_SCALE = {"average-drop", "average-increase", "average-gain", "percentage-in"}
EXPLANATION = {
    "average-drop": {}, "average-increase": {}, "average-gain": {},
    "insertion": {"steps": 7}, "deletion": {"steps": 7}, "percentage-in": {"fraction": 0.3},
    "perturbation-auc": {}, "perturbation-auc-negative": {"mode": "negative"},
    "road": {"fractions": (0.2, 0.5), "score": "probability", "order": "combined"},
}


def build(name: str, **kw):
    if name == "perturbation-auc-negative":
        name = "perturbation-auc"
    return registry.build(name, **kw)


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", registry.names("metric"))
def test_registered_components(name):
    """Build, round trip and field descriptions: tests/test_contracts.py (every component)."""
    m = registry.build(name)
    assert m.kind == "metric" and m.family in ("explanation", "localisation", "segmentation")
    assert m.__doc__ and len(m.__doc__) > 200, "each metric documents its conventions"


def test_bad_config_is_rejected():
    with pytest.raises(ValidationError, match="fractions"):
        registry.build("perturbation-auc", fractions=(0.5, 0.1))
    with pytest.raises(ValidationError, match="output"):
        registry.build("average-gain", output="logit")
    with pytest.raises(ValidationError, match="steps"):
        registry.build("insertion", steps=0)
    with pytest.raises(ValidationError, match="empty_value"):
        registry.build("dice", empty_value=2.0)


# ---------------------------------------------------------------------------------------------
# Ranges
# ---------------------------------------------------------------------------------------------
@SLOW
@given(shapes)
def test_explanation_ranges(params):
    seed, b, h, w = params
    x, s = images_and_maps(seed, b, h, w)
    for name in ("average-drop", "average-increase", "average-gain", "percentage-in"):
        v = build(name, **EXPLANATION[name])(MODEL, x, s)
        assert v.shape == (b,) and bool(((v >= 0) & (v <= 100)).all()), (name, v)
    for name in ("insertion", "deletion"):
        v = build(name, **EXPLANATION[name])(MODEL, x, s)
        assert bool(((v >= 0) & (v <= 1)).all()), (name, v)
    v = build("perturbation-auc")(MODEL, x, s)
    assert bool(((v >= 0) & (v <= 0.9 + 1e-12)).all())
    v = build("perturbation-auc", normalize=True, score="probability")(MODEL, x, s)
    assert bool(((v >= 0) & (v <= 1)).all())


@FAST
@given(shapes)
def test_perturbation_curve_starts_at_the_prediction(params):
    seed, b, h, w = params
    x, s = images_and_maps(seed, b, h, w)
    f, c = build("perturbation-auc").curve(MODEL, x, s)
    assert torch.equal(c[:, 0], torch.ones(b)), "fraction 0 is the unmodified image, correct by definition"
    assert f[0] == 0 and len(f) == 10


# ---------------------------------------------------------------------------------------------
# Segmentation identities (wrapping foveal.metrics.segmentation)
# ---------------------------------------------------------------------------------------------
masks_st = st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(1, 10), st.integers(1, 10),
                     st.floats(0.0, 1.0))


def random_masks(seed, b, h, w, p):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, generator=g) < p, torch.rand(b, h, w, generator=g) < p


@FAST
@given(masks_st)
def test_dice_iou_identities(params):
    a, bm = random_masks(*params)
    dice, iou = registry.build("dice"), registry.build("iou")
    d, i = dice(a, bm), iou(a, bm)
    assert bool(((i >= 0) & (i <= d + 1e-12) & (d <= 1)).all())
    torch.testing.assert_close(d, 2 * i / (1 + i), rtol=0, atol=1e-6)
    torch.testing.assert_close(d, dice(bm, a), rtol=0, atol=0)
    torch.testing.assert_close(i, iou(bm, a), rtol=0, atol=0)
    nonempty = a.flatten(1).any(1)
    assert bool((dice(a, a)[nonempty] == 1).all()) and bool((iou(a, a)[nonempty] == 1).all())
    both_empty = ~a.flatten(1).any(1) & ~bm.flatten(1).any(1)
    assert bool((d[both_empty] == 1).all()), "empty/empty = empty_value (1 by default)"
    d_nan = registry.build("dice", empty_value=float("nan"))(a, bm)
    assert bool(torch.isnan(d_nan[both_empty]).all()) and bool((d_nan[~both_empty] == d[~both_empty]).all())


@FAST
@given(masks_st)
def test_pooled_vs_per_image(params):
    a, bm = random_masks(*params)
    for name in ("dice", "iou"):
        per, pooled = registry.build(name), registry.build(name, averaging="pooled")
        stats = pooled.statistics(a, bm)
        assert stats.shape == (a.shape[0], 3)
        # per-image reduce of the statistics == mean of compute()
        assert math.isclose(per.aggregate(stats), float(per(a, bm).double().mean()), abs_tol=1e-6)
        inter, sp, sg = stats.sum(0).tolist()
        den = sp + sg if name == "dice" else sp + sg - inter
        expected = (2 * inter if name == "dice" else inter) / den if den > 0 else 1.0
        assert math.isclose(pooled.aggregate(stats), expected, abs_tol=1e-12)
        assert math.isclose(pooled.score(a, bm), expected, abs_tol=1e-12)
        with pytest.raises(InputError, match="pooled"):
            pooled.aggregate(pooled(a, bm))


@FAST
@given(st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(2, 9), st.integers(2, 9)))
def test_mean_dice_properties(params):
    seed, b, h, w = params
    g = torch.Generator().manual_seed(seed)
    prob, gt = torch.rand(b, h, w, generator=g), torch.rand(b, h, w, generator=g) < 0.4
    md, mi = registry.build("mean-dice")(prob, gt), registry.build("mean-iou")(prob, gt)
    assert bool(((mi >= 0) & (mi <= md + 1e-12) & (md <= 1)).all())
    # mean over thresholds of the curve; invariant to positive affine maps (min-max normalisation)
    torch.testing.assert_close(registry.build("mean-dice")(3 * prob + 1, gt), md)
    # a perfect binary prediction scores 1 at every threshold above 0 and |G|/(H*W)-dependent at 0
    nonempty = gt.flatten(1).any(1) & ~gt.flatten(1).all(1)
    perfect = registry.build("mean-dice")(gt.float(), gt)
    n = gt[0].numel()
    at_zero = 2 * gt.flatten(1).sum(1).double() / (gt.flatten(1).sum(1).double() + n)
    expected = (255 + at_zero) / 256
    torch.testing.assert_close(perfect[nonempty].double(), expected[nonempty], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Rank-based invariance: strictly increasing transforms that create no new ties
# ---------------------------------------------------------------------------------------------
TRANSFORMS = [lambda s: 3 * s + 1, lambda s: torch.exp(s / 7), lambda s: s**3 + s, lambda s: torch.sigmoid(s - 2)]


@SLOW
@given(shapes, st.integers(2, 6), st.sampled_from(range(len(TRANSFORMS))))
def test_rank_metrics_invariant_to_increasing_transforms(params, levels, t):
    seed, b, h, w = params
    x, s = images_and_maps(seed, b, h, w, levels=levels)  # integer levels: exact, ties preserved
    s2 = TRANSFORMS[t](s)
    assert torch.equal(torch.sort(s2.flatten(1), 1).indices, torch.sort(s.flatten(1), 1).indices)
    for name in ("insertion", "deletion", "percentage-in", "perturbation-auc", "perturbation-auc-negative", "road"):
        m = build(name, **EXPLANATION[name])
        torch.testing.assert_close(m(MODEL, x, s), m(MODEL, x, s2), rtol=0, atol=0)
    keep = registry.build("average-drop", keep_fraction=0.5)
    torch.testing.assert_close(keep(MODEL, x, s), keep(MODEL, x, s2), rtol=0, atol=0)
    g = torch.Generator().manual_seed(seed + 1)
    masks = torch.rand(b, h, w, generator=g) < 0.3
    pg = registry.build("pointing-game", tolerance=2)
    torch.testing.assert_close(pg(s, masks), pg(s2, masks), rtol=0, atol=0, equal_nan=True)


@FAST
@given(shapes)
def test_mean_threshold_metrics_invariant_to_positive_affine_maps(params):
    seed, b, h, w = params
    _, s = images_and_maps(seed, b, h, w)
    masks = torch.rand(b, h, w, generator=torch.Generator().manual_seed(seed)) < 0.5
    for q in ("pixel-accuracy", "ap", "miou"):
        m = registry.build("saliency-segmentation", quantity=q)
        v = m(s, masks)
        assert bool(((v >= 0) & (v <= 1)).all())
        torch.testing.assert_close(v, m(5 * s - 2, masks), rtol=0, atol=1e-12)
        st_ = m.statistics(s, masks)
        assert 0 <= m.aggregate(st_) <= 1


# ---------------------------------------------------------------------------------------------
# Batch independence, permutation, no mutation, model left as found, dtype/device kept
# ---------------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(shapes)
def test_batch_size_and_permutation_invariance(params):
    seed, b, h, w = params
    x, s = images_and_maps(seed, b, h, w)
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(seed))
    masks = torch.rand(b, h, w, generator=torch.Generator().manual_seed(seed)) < 0.4
    for name, kw in EXPLANATION.items():
        m = build(name, **kw, batch_size=3)
        full = m(MODEL, x, s)
        one = torch.cat([m(MODEL, x[i : i + 1], s[i : i + 1]) for i in range(b)])
        # float32 forwards differ by ~1e-7 between batch sizes; percent-scale metrics (x100 of a
        # ratio of probabilities) carry that noise amplified, so their tolerance is x100.
        tol = 1e-3 if name in PERCENT_SCALE else 1e-5
        torch.testing.assert_close(full, one, rtol=1e-5, atol=tol, equal_nan=True, msg=name)
        torch.testing.assert_close(m(MODEL, x[perm], s[perm]), full[perm], rtol=1e-5, atol=tol, equal_nan=True)
    for name in ("pointing-game", "saliency-segmentation", "mean-dice", "dice"):
        m = registry.build(name)
        sal = s if name != "dice" else s > 0.5
        full = m(sal, masks)
        one = torch.cat([m(sal[i : i + 1], masks[i : i + 1]) for i in range(b)])
        torch.testing.assert_close(full, one, equal_nan=True, msg=name)
        torch.testing.assert_close(m(sal[perm], masks[perm]), full[perm], equal_nan=True)


def _state(model):
    return ({n: m.training for n, m in model.named_modules()},
            {n: (p.requires_grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
            {k: v.clone() for k, v in model.state_dict().items()})


@pytest.mark.parametrize("name", list(EXPLANATION))
def test_inputs_not_mutated_and_model_left_as_found(name):
    model = TinyCNN()
    model.train()
    model.fc.weight.requires_grad_(False)
    x, s = images_and_maps(3, 2, 8, 8)
    x.requires_grad_(True)
    before = (x.detach().clone(), s.clone(), _state(model))
    build(name, **EXPLANATION[name])(model, x, s, targets=[1, 2])
    assert torch.equal(x.detach(), before[0]) and torch.equal(s, before[1])
    modes, grads, sd = _state(model)
    assert modes == before[2][0], "train/eval flags restored"
    assert {k: v[0] for k, v in grads.items()} == {k: v[0] for k, v in before[2][1].items()}
    assert all(g is None for _, g in grads.values()), "no gradient written"
    assert all(torch.equal(sd[k], before[2][2][k]) for k in sd), "BN statistics untouched (eval mode)"
    assert x.grad is None


def test_localisation_and_segmentation_inputs_not_mutated():
    s = torch.rand(2, 9, 9)
    m = torch.rand(2, 9, 9) < 0.3
    s0, m0 = s.clone(), m.clone()
    for name in ("pointing-game", "saliency-segmentation", "mean-dice", "mean-iou", "dice", "iou"):
        registry.build(name)(s, m)
    assert torch.equal(s, s0) and torch.equal(m, m0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device_kept(dtype):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        model = TinyCNN().to(device=dev, dtype=dtype)
        x, s = images_and_maps(0, 2, 8, 8)
        x, s = x.to(dev, dtype), s.to(dev, dtype)
        masks = (s > 0.5).to(dev)
        for name, kw in EXPLANATION.items():
            v = build(name, **kw)(model, x, s)
            assert v.dtype == dtype and v.device.type == dev, (name, v.dtype, v.device)
        for name in ("pointing-game", "saliency-segmentation", "mean-dice", "mean-iou", "dice", "iou"):
            v = registry.build(name)(s, masks)
            assert v.dtype == dtype and v.device.type == dev, (name, v.dtype, v.device)


# ---------------------------------------------------------------------------------------------
# Oracle beats random; constant model
# ---------------------------------------------------------------------------------------------
@SLOW
@given(st.integers(0, 2**31 - 1), st.sampled_from(["zero", "black", "mean"]))
def test_oracle_map_beats_random_map(seed, baseline):
    h = w = 12
    region = torch.zeros(h, w)
    region[2:6, 3:8] = 1
    model = RegionModel(region)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 3, h, w, generator=g) * 0.3
    x[:, 0] += 2.0 * region  # class 1 evidence lives in R only
    oracle = region.expand(3, h, w) + 0.01 * torch.rand(3, h, w, generator=g)
    rand = torch.rand(3, h, w, generator=g)
    dele = registry.build("deletion", steps=12, baseline=baseline)
    ins = registry.build("insertion", steps=12, baseline=baseline)
    assert bool((dele(model, x, oracle) < dele(model, x, rand)).all())
    assert bool((ins(model, x, oracle) > ins(model, x, rand)).all())
    pos = registry.build("perturbation-auc", score="probability", baseline=baseline)
    neg = registry.build("perturbation-auc", score="probability", mode="negative", baseline=baseline)
    assert bool((pos(model, x, oracle) < pos(model, x, rand)).all())
    assert bool((neg(model, x, oracle) > neg(model, x, rand)).all())
    masks = region.bool().expand(3, h, w)
    assert bool((registry.build("pointing-game", tolerance=0)(oracle, masks) == 1).all())


@SLOW
@given(shapes)
def test_constant_model_gives_zero_drop_increase_gain(params):
    seed, b, h, w = params
    x, s = images_and_maps(seed, b, h, w)
    model = ConstantModel()
    for name in ("average-drop", "average-increase", "average-gain"):
        for kw in ({}, {"keep_fraction": 0.5}, {"baseline": "blur"}):
            v = registry.build(name, **kw)(model, x, s)
            assert torch.equal(v, torch.zeros(b)), (name, kw, v)
    for name in ("insertion", "deletion"):
        v = registry.build(name, steps=5)(model, x, s)
        expected = torch.softmax(model.logits.detach(), 0).max().expand(b)
        torch.testing.assert_close(v, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Pointing game and ties
# ---------------------------------------------------------------------------------------------
@FAST
@given(shapes, st.floats(0, 6))
def test_pointing_game_properties(params, tol):
    seed, b, h, w = params
    _, s = images_and_maps(seed, b, h, w, levels=3)
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(b, h, w, generator=g) < 0.2
    masks[0] = False  # always one empty mask
    hit = L.pointing_game(s, masks, tol)
    assert math.isnan(float(hit[0])), "empty mask is not counted"
    assert bool(torch.isnan(hit).eq(~masks.flatten(1).any(1)).all())
    more = L.pointing_game(s, masks, tol + 1.5)
    counted = ~torch.isnan(hit)
    assert bool((more[counted] >= hit[counted]).all()), "a larger tolerance never loses a hit"
    # tie-breaking: the first maximum in row-major order
    idx = s.flatten(1).argmax(1)
    first = (s.flatten(1) == s.flatten(1).max(1, keepdim=True).values).float().argmax(1)
    assert torch.equal(idx, first)
    exact = L.pointing_game(s, masks, 0)
    inside = masks.flatten(1).gather(1, first[:, None])[:, 0].float()
    assert torch.equal(exact[counted], inside[counted])


def test_tie_breaking_is_row_major():
    s = torch.zeros(1, 2, 3)  # all tied
    ranks = E.saliency_ranks(s)
    assert ranks.tolist() == [[0, 1, 2, 3, 4, 5]]
    assert E.saliency_ranks(s, descending=False).tolist() == [[0, 1, 2, 3, 4, 5]]
    s = torch.tensor([[[1.0, 2.0, 2.0], [0.0, 2.0, 1.0]]])
    assert E.saliency_ranks(s).tolist() == [[3, 0, 1, 5, 2, 4]]
    assert E.saliency_ranks(s, descending=False).tolist() == [[1, 3, 4, 0, 5, 2]]


def test_bad_inputs_raise_clear_errors():
    x, s = images_and_maps(0, 2, 8, 8)
    m = registry.build("deletion", steps=4)
    with pytest.raises(InputError, match="saliency"):
        m(MODEL, x, s[:, :4])
    with pytest.raises(InputError, match="targets"):
        m(MODEL, x, s, targets=[0])
    with pytest.raises(InputError, match="out of range"):
        m(MODEL, x, s, targets=9)
    with pytest.raises(InputError, match="masks"):
        registry.build("pointing-game")(s, torch.rand(2, 8, 8))
    with pytest.raises(InputError, match="shape"):
        registry.build("dice")(torch.rand(2, 8, 8), torch.zeros(2, 4, 4, dtype=torch.bool))


class TinySegmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.head(x)


@SLOW
@given(shapes)
def test_segmentation_outputs_are_scored_per_image(params):
    """(B, K, H, W) outputs: targets=None freezes the predicted region of each unmodified image."""
    seed, b, h, w = params
    x, s = images_and_maps(seed, b, h, w)
    model = TinySegmenter()
    for name in ("deletion", "insertion", "average-drop", "percentage-in"):
        m = registry.build(name, **({"steps": 5} if name in ("deletion", "insertion") else {}))
        full = m(model, x, s)
        one = torch.cat([m(model, x[i : i + 1], s[i : i + 1]) for i in range(b)])
        torch.testing.assert_close(full, one, rtol=1e-5, atol=1e-5, equal_nan=True)
        assert bool(torch.isfinite(full).all()) or name == "average-drop"
    with pytest.raises(InputError, match="accuracy"):
        registry.build("perturbation-auc")(model, x, s)
