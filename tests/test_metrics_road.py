"""ROAD (Rong et al., ICML 2022): noisy linear imputation and the MoRF / LeRF curves.

Oracles: pytorch-grad-cam 1.5 (``NoisyLinearImputer``, ``ROADMostRelevantFirst(Average)``,
``ROADLeastRelevantFirstAverage``, ``ROADCombined``) and Quantus (``noisy_linear_imputation``,
``ROAD``) on the same inputs; the conventions that make them comparable are in docs/metrics.md
("ROAD"). Properties: the imputed pixels solve the neighbour-average equations, kept pixels are
untouched, the imputation is affine-equivariant, per-sample values do not depend on the batch.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch import nn

from foveal import registry
from foveal.core.errors import InputError
from foveal.metrics.explanation import ROAD_FRACTIONS, noisy_linear_imputation, road, road_curve
from foveal.testing import check_component

from .test_metrics_properties import RegionModel

# pytorch-grad-cam calls numpy functions on torch tensors (numpy 2 deprecation warnings of the oracle)
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")
FAST = settings(max_examples=15, deadline=None)
NEIGHBOURS = [((-1, -1), 1 / 12), ((-1, 0), 1 / 6), ((-1, 1), 1 / 12), ((0, -1), 1 / 6), ((0, 1), 1 / 6),
              ((1, -1), 1 / 12), ((1, 0), 1 / 6), ((1, 1), 1 / 12)]


class TinyCNN(nn.Module):
    def __init__(self, channels: int = 3, classes: int = 5, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(channels, 6, 3, padding=1)
        self.fc = nn.Linear(6, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class PixelLinear(nn.Module):
    """Logits linear in every pixel: removing pixels changes the prediction (accuracy curves move)."""

    def __init__(self, shape=(1, 10, 10), classes: int = 4, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(int(np.prod(shape)), classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(self.fc.weight.shape, generator=g))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x.flatten(1))


def distinct_maps(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Maps in (0, 1) with well-separated distinct values (no ties, also after ``1 - map`` in float32)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(h * w, generator=g) for _ in range(b)]).float()
    return ((perm + 1) / (h * w + 1)).view(b, h, w)


def pgc():
    return pytest.importorskip("pytorch_grad_cam.metrics.road")


@pytest.fixture
def pgc_noise(monkeypatch):
    """pytorch-grad-cam builds its imputer with the default noise 0.01: set that default."""
    road_mod = pgc()

    def set_noise(noise: float) -> None:
        monkeypatch.setattr(road_mod.NoisyLinearImputer.__init__, "__defaults__", (noise, road_mod.neighbors_weights))

    return set_noise


# ---------------------------------------------------------------------------------------------
# The imputation operator
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("channels", [1, 3])
def test_imputation_equals_pytorch_grad_cam_and_quantus(seed, channels):
    road_mod = pgc()
    q = pytest.importorskip("quantus.functions.perturb_func")
    g = torch.Generator().manual_seed(seed)
    h, w = 9 + seed, 7 + 2 * seed
    img = torch.randn(channels, h, w, generator=g)
    removed = torch.rand(h, w, generator=g) < (0.2, 0.6, 0.95)[seed]
    removed[0, 0] = False  # at least one kept pixel
    ours = noisy_linear_imputation(img, removed, noise=0.0)
    theirs = road_mod.NoisyLinearImputer(noise=0.0)(img, (~removed).float())
    quantus = q.noisy_linear_imputation(img.numpy(), np.flatnonzero(removed.numpy().ravel()), noise=0.0)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours, torch.from_numpy(quantus), rtol=0, atol=1e-5)
    assert torch.equal(ours[:, ~removed], img[:, ~removed]), "kept pixels are untouched"
    # the noise: one randn((C, m)) draw, as pytorch-grad-cam makes it from the same seed
    noisy = noisy_linear_imputation(img, removed, noise=0.01, generator=torch.Generator().manual_seed(11))
    torch.manual_seed(11)
    theirs_noisy = road_mod.NoisyLinearImputer(noise=0.01)(img, (~removed).float())
    torch.testing.assert_close(noisy, theirs_noisy, rtol=0, atol=1e-5)
    assert not torch.equal(noisy, ours)


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(1, 8), st.integers(1, 8), st.floats(0.05, 0.95))
def test_imputed_pixels_solve_the_neighbour_equations(seed, h, w, p):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(2, h, w, generator=g, dtype=torch.float64)
    removed = torch.rand(h, w, generator=g) < p
    removed.view(-1)[int(torch.randint(h * w, (1,), generator=g))] = False
    out = noisy_linear_imputation(img, removed, noise=0.0)
    assert torch.equal(out[:, ~removed], img[:, ~removed])
    for r, c in removed.nonzero().tolist():
        acc, tot = torch.zeros(2, dtype=torch.float64), 0.0
        for (dy, dx), wt in NEIGHBOURS:
            if 0 <= r + dy < h and 0 <= c + dx < w:
                acc += wt * out[:, r + dy, c + dx]
                tot += wt
        torch.testing.assert_close(out[:, r, c], acc / tot, rtol=0, atol=1e-9)


@FAST
@given(st.integers(0, 2**31 - 1), st.floats(-3, 3), st.floats(0.1, 5))
def test_imputation_is_affine_equivariant(seed, shift, scale):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(3, 6, 7, generator=g, dtype=torch.float64)
    removed = torch.rand(6, 7, generator=g) < 0.7
    removed[3, 3] = False
    a = noisy_linear_imputation(scale * img + shift, removed, noise=0.0)
    b = scale * noisy_linear_imputation(img, removed, noise=0.0) + shift
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    const = noisy_linear_imputation(torch.full((1, 6, 7), shift, dtype=torch.float64), removed, noise=0.0)
    torch.testing.assert_close(const, torch.full_like(const, shift), rtol=0, atol=1e-12)


def test_imputation_errors():
    img = torch.randn(3, 4, 4)
    with pytest.raises(InputError, match="every pixel is removed"):
        noisy_linear_imputation(img, torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(InputError, match=r"expected image \(C, H, W\) and removed \(H, W\)"):
        noisy_linear_imputation(img, torch.ones(5, 4, dtype=torch.bool))
    assert torch.equal(noisy_linear_imputation(img, torch.zeros(4, 4, dtype=torch.bool)), img)


# ---------------------------------------------------------------------------------------------
# The metric against pytorch-grad-cam
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("score", ["probability", "logit"])
@pytest.mark.parametrize("order", ["morf", "lerf", "combined"])
def test_road_equals_pytorch_grad_cam(order, score, pgc_noise):
    road_mod = pgc()
    targets_mod = pytest.importorskip("pytorch_grad_cam.utils.model_targets")
    pgc_noise(0.0)
    model = TinyCNN().eval()
    x = torch.randn(3, 3, 11, 13)
    maps = distinct_maps(3, 11, 13)
    target = targets_mod.ClassifierOutputSoftmaxTarget if score == "probability" else targets_mod.ClassifierOutputTarget
    cats = model(x).argmax(1).tolist()
    percentiles = [10, 20, 30, 40, 50, 60, 70, 80, 90]  # kept percentages
    oracle = {"morf": road_mod.ROADMostRelevantFirstAverage, "lerf": road_mod.ROADLeastRelevantFirstAverage,
              "combined": road_mod.ROADCombined}[order](percentiles)
    theirs = oracle(x, maps.numpy(), [target(c) for c in cats], model)
    metric = registry.build("road", order=order, score=score, selection="threshold", difference=True, noise=0.0)
    ours = metric(model, x, maps)
    torch.testing.assert_close(ours, torch.from_numpy(np.asarray(theirs, dtype=np.float32)), rtol=0, atol=2e-6)
    assert metric.higher_is_better == (order != "morf")


def test_single_fraction_equals_pytorch_grad_cam_percentile(pgc_noise):
    road_mod = pgc()
    targets_mod = pytest.importorskip("pytorch_grad_cam.utils.model_targets")
    pgc_noise(0.0)
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 12, 12)
    maps = distinct_maps(2, 12, 12, seed=4)
    cats = model(x).argmax(1).tolist()
    for percentile in (80, 35):  # ROADMostRelevantFirst(percentile=p) removes 1 - p/100 of the pixels
        theirs = road_mod.ROADMostRelevantFirst(percentile)(x, maps.numpy(), [
            targets_mod.ClassifierOutputSoftmaxTarget(c) for c in cats], model)
        _, ours = road_curve(model, x, maps, fractions=(1 - percentile / 100,), score="probability",
                             selection="threshold", difference=True, noise=0.0)
        torch.testing.assert_close(ours[:, 0], torch.from_numpy(theirs), rtol=0, atol=2e-6)


def test_noise_equals_pytorch_grad_cam_with_the_same_seed(pgc_noise):
    """One image: a generator seeded with ``seed`` draws, fraction by fraction, exactly what
    pytorch-grad-cam draws from torch's global generator after ``torch.manual_seed(seed)``
    (their percentiles listed in the same removal order: 90 = 10% removed first)."""
    road_mod = pgc()
    targets_mod = pytest.importorskip("pytorch_grad_cam.utils.model_targets")
    pgc_noise(0.01)
    model = TinyCNN().eval()
    x = torch.randn(1, 3, 10, 10) * 0.3
    maps = distinct_maps(1, 10, 10, seed=2)
    cat = int(model(x).argmax())
    torch.manual_seed(7)
    theirs = road_mod.ROADMostRelevantFirstAverage([90, 70, 50, 30, 10])(
        x, maps.numpy(), [targets_mod.ClassifierOutputTarget(cat)], model)
    ours = road(model, x, maps, fractions=(0.1, 0.3, 0.5, 0.7, 0.9), score="logit", selection="threshold",
                difference=True, noise=0.01, seed=7)
    torch.testing.assert_close(ours, torch.from_numpy(theirs), rtol=0, atol=2e-6)
    without = road(model, x, maps, fractions=(0.1, 0.3, 0.5, 0.7, 0.9), score="logit", selection="threshold",
                   difference=True, noise=0.0)
    assert not torch.allclose(ours, without, atol=1e-6), "the noise is drawn and added"


# ---------------------------------------------------------------------------------------------
# The metric against Quantus
# ---------------------------------------------------------------------------------------------
def test_road_equals_quantus():
    """Quantus' ROAD: accuracy of the original prediction per removed percentage, top
    ``int(H*W*p/100)`` pixels by ``argsort(-a)``, mean over images. Quantus 0.6 needs
    single-channel images (it indexes the broadcast (C*H*W) attribution order into an (H*W)
    mask) and draws its noise from numpy's global generator: compared with noise 0."""
    quantus = pytest.importorskip("quantus")
    model = PixelLinear().eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 1, 10, 10, generator=g)
    maps = torch.rand(8, 10, 10, generator=g)
    y = model(x).argmax(1).numpy()
    percentages = [1, 9, 25, 40, 55, 70, 85, 99]
    fractions = [p / 100 for p in percentages]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = quantus.ROAD(percentages=percentages, noise=0.0, disable_warnings=True)(
            model=model, x_batch=x.numpy(), y_batch=y, a_batch=maps[:, None].numpy(), device="cpu")
        per_image = [list(quantus.ROAD(percentages=percentages, noise=0.0, disable_warnings=True)(
            model=model, x_batch=x[i : i + 1].numpy(), y_batch=y[i : i + 1], a_batch=maps[i : i + 1, None].numpy(),
            device="cpu").values()) for i in range(8)]
    _, ours = registry.build("road", fractions=fractions, noise=0.0).curve(model, x, maps)
    assert torch.equal(ours, torch.tensor(per_image, dtype=ours.dtype))
    torch.testing.assert_close(ours.double().mean(0), torch.tensor(list(theirs.values())), rtol=0, atol=1e-12)
    assert 0 < float(ours.mean()) < 1, "the curve moves: the comparison is not trivially all-correct"


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------
@FAST
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(5, 9), st.integers(5, 9),
       st.sampled_from(["morf", "lerf", "combined"]), st.sampled_from(["rank", "threshold"]))
def test_per_sample_values_do_not_depend_on_the_batch(seed, b, h, w, order, selection):
    g = torch.Generator().manual_seed(seed)
    model = TinyCNN(seed=seed % 3).eval()
    x, s = torch.randn(b, 3, h, w, generator=g), torch.rand(b, h, w, generator=g)
    kw = dict(order=order, selection=selection, score="probability", fractions=(0.0, 0.3, 0.6, 0.9))
    whole = road(model, x, s, **kw, batch_size=64)
    chunked = road(model, x, s, **kw, batch_size=1)
    alone = torch.cat([road(model, x[i : i + 1], s[i : i + 1], **kw) for i in range(b)])
    perm = torch.randperm(b, generator=g)
    permuted = road(model, x[perm], s[perm], **kw, batch_size=3)
    torch.testing.assert_close(whole, chunked, rtol=0, atol=1e-6)
    torch.testing.assert_close(whole, alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(whole[perm], permuted, rtol=0, atol=1e-6)


@FAST
@given(st.integers(0, 2**31 - 1), st.integers(1, 3))
def test_curve_identities(seed, b):
    g = torch.Generator().manual_seed(seed)
    model = PixelLinear((3, 6, 6)).eval()
    x, s = torch.randn(b, 3, 6, 6, generator=g), torch.rand(b, 6, 6, generator=g)
    fr = (0.0, 0.25, 0.5, 0.75)
    kw = dict(fractions=fr, score="probability")
    f, morf = road_curve(model, x, s, order="morf", **kw)
    _, lerf = road_curve(model, x, s, order="lerf", **kw)
    _, comb = road_curve(model, x, s, order="combined", **kw)
    _, diff = road_curve(model, x, s, order="morf", difference=True, **kw)
    p0 = model(x).softmax(1).max(1).values
    assert torch.equal(f, torch.tensor(fr, dtype=torch.float64))
    torch.testing.assert_close(morf[:, 0], p0, rtol=0, atol=1e-6)  # fraction 0: the unmodified image
    torch.testing.assert_close(comb, (lerf - morf) / 2, rtol=0, atol=0)
    torch.testing.assert_close(diff, morf - p0[:, None], rtol=0, atol=1e-6)
    torch.testing.assert_close(road(model, x, s, order="lerf", **kw), lerf.mean(1), rtol=0, atol=0)
    _, acc = road_curve(model, x, s, fractions=fr)
    assert bool(((acc == 0) | (acc == 1)).all()) and bool((acc[:, 0] == 1).all())


def test_rank_counts_and_threshold_ties():
    """rank: floor(f * H * W) pixels, ties in row-major order; threshold: every pixel at the
    percentile threshold, ties included; a constant map under threshold removes everything: NaN."""
    x = torch.zeros(1, 1, 4, 5)
    x[0, 0] = torch.arange(20.0).view(4, 5)
    weights = torch.zeros(2, 20)
    weights[1] = 1.0  # logit of class 1 = sum of the pixels: the imputed image's pixel sum
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(weights)
    s = torch.zeros(1, 4, 5)
    s[0, 0, :3] = 1.0  # three tied maxima
    _, v = road_curve(model, x, s, targets=1, fractions=(0.1,), score="logit", noise=0.0)
    removed = torch.zeros(20, dtype=torch.bool)
    removed[:2] = True  # floor(0.1 * 20) = 2: the first two maxima in row-major order
    expected = noisy_linear_imputation(x[0], removed.view(4, 5), noise=0.0).sum()
    torch.testing.assert_close(v[0, 0], expected)
    _, t = road_curve(model, x, s, targets=1, fractions=(0.1,), score="logit", noise=0.0, selection="threshold")
    removed[2] = True  # the threshold is the value 1: all three tied maxima go
    torch.testing.assert_close(t[0, 0], noisy_linear_imputation(x[0], removed.view(4, 5), noise=0.0).sum())
    _, nan = road_curve(model, x, torch.ones(1, 4, 5), targets=1, fractions=(0.5,), selection="threshold")
    assert bool(torch.isnan(nan).all())


def test_oracle_map_beats_a_random_map():
    g = torch.Generator().manual_seed(0)
    region = torch.zeros(12, 12, dtype=torch.bool)
    region[3:7, 4:9] = True
    model = RegionModel(region)
    x = torch.randn(4, 3, 12, 12, generator=g) * 0.1
    x[:, 0, region] += 1.0
    oracle = region.float().expand(4, 12, 12) + 0.01 * torch.rand(4, 12, 12, generator=g)
    rand = torch.rand(4, 12, 12, generator=g)
    kw = dict(score="probability", fractions=(0.1, 0.2, 0.3))
    assert bool((road(model, x, oracle, order="morf", **kw) < road(model, x, rand, order="morf", **kw)).all())
    assert bool((road(model, x, oracle, order="lerf", **kw) > road(model, x, rand, order="lerf", **kw)).all())


def test_noise_seed_and_global_generator():
    model = TinyCNN().eval()
    x, s = torch.randn(2, 3, 8, 8), torch.rand(2, 8, 8)
    kw = dict(score="logit", noise=0.5)
    assert torch.equal(road(model, x, s, seed=3, **kw), road(model, x, s, seed=3, **kw))
    assert not torch.equal(road(model, x, s, seed=3, **kw), road(model, x, s, seed=4, **kw))
    torch.manual_seed(5)
    a = road(model, x, s, seed=None, **kw)
    torch.manual_seed(5)
    assert torch.equal(a, road(model, x, s, seed=None, **kw))


def test_component_contract_and_conventions():
    m = check_component("road")
    assert m.family == "explanation" and not m.higher_is_better and len(m.__doc__) > 200
    for fname, f in type(m).Config.model_fields.items():
        assert f.description, fname
    assert m.config.fractions == ROAD_FRACTIONS and m.config.noise == 0.01 and m.config.score == "accuracy"
    model = TinyCNN().eval()
    x, s = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.rand(2, 8, 8, dtype=torch.float64)
    model.double()
    before = (x.clone(), s.clone(), {k: v.clone() for k, v in model.state_dict().items()})
    model.train()
    v = registry.build("road", score="probability")(model, x, s)
    assert v.shape == (2,) and v.dtype == torch.float64 and model.training
    assert torch.equal(x, before[0]) and torch.equal(s, before[1])
    assert all(torch.equal(model.state_dict()[k], t) for k, t in before[2].items())


def test_segmentation_outputs():
    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    model = Seg().eval()
    x, s = torch.randn(2, 3, 8, 8), torch.rand(2, 8, 8)
    v = road(model, x, s, score="probability", fractions=(0.2, 0.5))
    assert v.shape == (2,) and bool(((v >= 0) & (v <= 1)).all())
    with pytest.raises(InputError, match="accuracy"):
        road(model, x, s)


def test_bad_inputs_raise_clear_errors():
    model = TinyCNN().eval()
    x, s = torch.randn(2, 3, 8, 8), torch.rand(2, 8, 8)
    with pytest.raises(ValidationError, match="fractions"):
        registry.build("road", fractions=(0.5, 1.0))
    with pytest.raises(ValidationError, match="fractions"):
        registry.build("road", fractions=(0.5, 0.2))
    with pytest.raises(InputError, match=r"fractions: expected increasing values in \[0, 1\)"):
        road(model, x, s, fractions=(1.0,))
    with pytest.raises(InputError, match="order"):
        road(model, x, s, order="both")
    with pytest.raises(InputError, match="noise"):
        road(model, x, s, noise=-1.0)
    with pytest.raises(InputError, match="saliency"):
        road(model, x, s[:, :4])
    with pytest.raises(InputError, match="out of range"):
        road(model, x, s, targets=9)
