"""Gradient x input, integrated gradients and SmoothGrad against captum (InputXGradient,
IntegratedGradients, NoiseTunnel(Saliency)) under the same baseline / steps / method / noise, plus
the axioms and conventions captum does not cover (completeness, seeding, batch independence,
channel reductions, errors)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from foveal import registry
from foveal.core.errors import InputError
from foveal.core.modules import preserved_model_state
from foveal.explainers.input_gradients import path_weights, reduce_channels
from foveal.testing import check_explainer

SIZE = 24


def minmax(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = hi - lo
    return torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, 1), 0).view_as(x)


class Net(nn.Module):
    def __init__(self, act: type[nn.Module] = nn.ReLU, pool: type[nn.Module] = nn.MaxPool2d) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), act(), pool(2), nn.Conv2d(8, 12, 3, padding=1),
                                  act(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(48, 6))

    def forward(self, x):
        return self.body(x)


@pytest.fixture(scope="module")
def model():
    return Net().eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


TARGETS = [1, 4, 5]


def test_gradient_x_input_equals_captum(model, images):
    from captum.attr import InputXGradient

    attr = InputXGradient(model).attribute(images, target=TARGETS).detach()
    for reduction in ("abs-sum", "sum", "abs-of-sum", "positive"):
        ours = registry.build("grad-x-input", reduction=reduction).explain(model, images, TARGETS)
        ref = minmax(reduce_channels(attr, reduction))
        assert torch.allclose(ours, ref, atol=1e-5), (reduction, float((ours - ref).abs().max()))
    by_hand = {"abs-sum": attr.abs().sum(1), "sum": attr.sum(1), "abs-of-sum": attr.sum(1).abs(),
               "positive": attr.sum(1).clamp_min(0)}
    for reduction, ref in by_hand.items():
        assert torch.equal(reduce_channels(attr, reduction), ref)


@pytest.mark.parametrize("method", ["riemann_right", "riemann_left", "riemann_middle", "gausslegendre",
                                    "riemann_trapezoid"])
def test_integrated_gradients_equals_captum(model, images, method):
    from captum.attr import IntegratedGradients

    steps, baseline = 12, 0.25
    ref = IntegratedGradients(model).attribute(images, baselines=baseline, target=TARGETS, n_steps=steps,
                                               method=method).detach()
    e = registry.build("integrated-gradients", steps=steps, method=method, baseline=baseline, batch_size=7,
                       reduction="sum")
    with preserved_model_state(model):
        ours = e.attributions(model, images, TARGETS)
    if method == "riemann_trapezoid":  # captum's trapezoid weights sum to (m - 1) / m, ours to 1
        ref = ref * steps / (steps - 1)
    assert torch.allclose(ours, ref, atol=1e-5 * float(ref.abs().max())), float((ours - ref).abs().max())
    maps = e.explain(model, images, TARGETS)
    assert torch.allclose(maps, minmax(ref.sum(1)), atol=1e-5)


def test_integrated_gradients_completeness_float64(images):
    """Proposition 1: attributions sum to y(x) - y(x') (smooth model, Gauss-Legendre, float64)."""
    model = Net(nn.Softplus, nn.AvgPool2d).double().eval()
    x = images.double()
    e = registry.build("integrated-gradients", steps=32, method="gausslegendre", baseline=-0.5)
    with preserved_model_state(model), torch.no_grad():
        attr = e.attributions(model, x, TARGETS)
        gap = model(x)[range(3), TARGETS] - model(torch.full_like(x, -0.5))[range(3), TARGETS]
    assert torch.allclose(attr.flatten(1).sum(1), gap, rtol=1e-6, atol=1e-9), (attr.flatten(1).sum(1), gap)
    for method in ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre"):
        alphas, weights = path_weights(10, method)
        assert abs(weights.sum() - 1) < 1e-12 and alphas.min() >= 0 and alphas.max() <= 1


@pytest.mark.parametrize("nt_type,absolute", [("smoothgrad", True), ("smoothgrad_sq", True), ("vargrad", False),
                                              ("smoothgrad", False)])
def test_smoothgrad_equals_captum_noise_tunnel(model, images, nt_type, absolute):
    """Same noise: captum's NoiseTunnel after torch.manual_seed(seed) draws one (n, C, H, W)
    normal sample per call, which is our per-image draw; stdevs = noise_level * (max - min)."""
    from captum.attr import NoiseTunnel, Saliency

    n, level, seed = 6, 0.2, 7
    e = registry.build("smoothgrad", n_samples=n, noise_level=level, seed=seed, nt_type=nt_type, absolute=absolute,
                       batch_size=5, reduction="sum")
    with preserved_model_state(model):
        ours = e.attributions(model, images, TARGETS)
    for i in range(len(images)):
        x = images[i : i + 1]
        sigma = float(level * (x.max() - x.min()))
        torch.manual_seed(seed)
        ref = NoiseTunnel(Saliency(model)).attribute(x, nt_type=nt_type, nt_samples=n, stdevs=sigma,
                                                      target=TARGETS[i], abs=absolute).detach()
        assert torch.allclose(ours[i : i + 1], ref, atol=1e-5 * float(ref.abs().max())), \
            float((ours[i : i + 1] - ref).abs().max())


def test_smoothgrad_is_seeded_and_batch_independent(model, images):
    e = registry.build("smoothgrad", n_samples=4, seed=3)
    a, b = e.explain(model, images, TARGETS), e.explain(model, images, TARGETS)
    assert torch.equal(a, b)
    assert not torch.allclose(a, registry.build("smoothgrad", n_samples=4, seed=4).explain(model, images, TARGETS))
    alone = e.explain(model, images[1:2], TARGETS[1:2])
    assert torch.allclose(alone, a[1:2], atol=1e-6)


@pytest.mark.parametrize("name", ["grad-x-input", "integrated-gradients", "smoothgrad"])
def test_contract_targets_and_errors(model, images, name):
    kw = {"steps": 4} if name == "integrated-gradients" else {"n_samples": 3} if name == "smoothgrad" else {}
    e = registry.build(name, **kw)
    model.train()
    try:
        maps = check_explainer(e, model, images, TARGETS)
    finally:
        model.eval()
    assert maps.max() == 1.0
    # None = top class of the clean input; an int, a tensor, a callable give the same as the class list
    top = model(images).argmax(1)
    assert torch.allclose(e.explain(model, images, None), e.explain(model, images, top.tolist()), atol=1e-6)
    assert torch.allclose(e.explain(model, images, torch.tensor(TARGETS)), maps, atol=1e-6)
    assert torch.allclose(e.explain(model, images, lambda out: out[:, 2]), e.explain(model, images, 2), atol=1e-6)
    with pytest.raises(InputError, match="out of range"):
        e.explain(model, images, 6)
    with pytest.raises(InputError, match="channels"):
        e.explain(model, images[:, :1])
    with pytest.raises(InputError, match="4-D"):
        e.explain(model, images[0])


def test_bad_targets_raise_input_errors(model, images):
    for name in ("integrated-gradients", "smoothgrad"):
        e = registry.build(name, **({"steps": 2} if name == "integrated-gradients" else {"n_samples": 2}))
        with pytest.raises(InputError, match="expected 3 targets"):
            e.explain(model, images, [1, 2])
        with pytest.raises(InputError, match="int tensor"):
            e.explain(model, images, torch.tensor([1.0, 2.0, 3.0]))
        with pytest.raises(InputError, match="out of range"):
            e.explain(model, images, torch.tensor([1, 2, 9]))
