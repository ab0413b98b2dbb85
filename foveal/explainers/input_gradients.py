"""Input-space gradient baselines: gradient x input, integrated gradients and SmoothGrad.

Each computes an attribution ``(B, C, H, W)`` for the input pixels and reduces it over the
colour channels to a map (``reduction``); ``explain`` then min-max normalises it. Gradients are
taken with ``torch.autograd.grad`` to the input only (no parameter ``.grad`` is written). For the
methods that evaluate the model on other inputs (interpolations, noisy copies), targets are
pinned to the clean input's prediction (``targets=None``: its top class or predicted region), as
for the score-weighted CAMs. Cross-checked against captum (``InputXGradient``,
``IntegratedGradients``, ``NoiseTunnel(Saliency)``) in ``tests/test_input_gradients.py``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ..core.config import ComponentConfig
from ..core.errors import InputError
from ..core.explainer import Explainer, Targets, target_scores
from .cam import fixed_targets, target_rows

Reduction = Literal["abs-sum", "sum", "abs-of-sum", "positive"]


def reduce_channels(attr: torch.Tensor, reduction: str) -> torch.Tensor:
    """(B, C, H, W) attributions -> (B, H, W) maps.

    ``abs-sum``: ``sum_c |a_c|`` (the magnitude over colour channels, as SmoothGrad's and the
    PAIR saliency library's visualisations); ``sum``: the signed ``sum_c a_c``; ``abs-of-sum``:
    ``|sum_c a_c|`` (captum's ``visualize_image_attr`` with ``sign="absolute_value"``);
    ``positive``: ``ReLU(sum_c a_c)`` (captum's ``sign="positive"``)."""
    if reduction == "abs-sum":
        return attr.abs().sum(1)
    total = attr.sum(1)
    if reduction == "sum":
        return total
    if reduction == "abs-of-sum":
        return total.abs()
    if reduction == "positive":
        return total.clamp_min(0)
    raise InputError(f"reduction: expected one of abs-sum, sum, abs-of-sum, positive, got {reduction!r}")


class InputGradientConfig(ComponentConfig):
    reduction: Reduction = Field(
        "abs-sum", description="Channel reduction of the (B, C, H, W) attribution: abs-sum (sum of |a_c|), sum, "
        "abs-of-sum (|sum a_c|, captum's absolute_value view) or positive (ReLU of the sum).")


class InputGradientExplainer(Explainer):
    """Shared part: the per-image gradient of the target score with respect to the input, the
    channel reduction (``explain`` has checked the images against the model)."""

    Config = InputGradientConfig

    def attribute(self, model: nn.Module, images: torch.Tensor, targets: Targets, hooks: list) -> torch.Tensor:
        return reduce_channels(self.attributions(model, images, targets), self.config.reduction)

    def attributions(self, model: nn.Module, images: torch.Tensor, targets: Targets
                     ) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def input_gradient(model: nn.Module, x: torch.Tensor, targets: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d score / d x, output)`` for a batch ``x``; one score per image."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            output = model(x)
            scores = target_scores(output, targets)
            (grad,) = torch.autograd.grad(scores.sum(), x, allow_unused=True)
        if grad is None:
            raise InputError("the target score does not depend on the input images")
        return grad, output.detach()

    def clean_targets(self, model: nn.Module, images: torch.Tensor, targets: Targets) -> Any:
        """``targets=None`` pinned to the clean input's prediction (one forward without
        gradients); class indices as a list of B ints; other targets unchanged (callables and
        :class:`~foveal.core.SegmentationTarget` are applied to each evaluated output, as in the
        score-weighted CAMs). Class ranges are checked on the first evaluated batch."""
        if targets is None:
            with torch.no_grad():
                output = model(images)
            return fixed_targets(output, targets)
        if isinstance(targets, int):
            return [targets] * images.shape[0]
        b = images.shape[0]
        if isinstance(targets, torch.Tensor):
            if targets.is_floating_point() or targets.dim() > 1:
                raise InputError(f"targets: expected an int tensor of shape ({b},), got {tuple(targets.shape)} "
                                 f"{targets.dtype}")
            if targets.dim() == 0:
                return [int(targets)] * b
        elif callable(targets):
            return targets
        if len(targets) != b:
            raise InputError(f"targets: expected {b} targets (one per image), got {len(targets)}")
        return targets


class GradientXInput(InputGradientExplainer):
    """Gradient x input (Shrikumar et al., 2016, "Not just a black box", arXiv 1605.01713; the
    DeepLIFT papers' baseline): attribution ``x * dy^c/dx``, reduced over channels (``abs-sum`` by
    default). Equals captum's ``InputXGradient``. One forward and one backward."""

    def attributions(self, model: nn.Module, images: torch.Tensor, targets: Targets) -> torch.Tensor:
        grad, _ = self.input_gradient(model, images, targets)
        return images * grad


def path_weights(steps: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature nodes ``alpha`` in [0, 1] and weights for ``int_0^1 f(alpha) d alpha``:

    * ``riemann_right``: ``alpha = k / m``, k = 1..m, weights ``1/m`` (Sundararajan et al.'s
      Riemann-sum approximation); ``riemann_left``: k = 0..m-1; ``riemann_middle``: ``(k - 1/2) / m``;
    * ``riemann_trapezoid``: the composite trapezoid rule on ``m`` equally spaced nodes
      including both ends (weights ``1/(m-1)``, halved at the ends; they sum to 1);
    * ``gausslegendre``: ``numpy.polynomial.legendre.leggauss(m)`` mapped to [0, 1] (captum's
      default)."""
    m = steps
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(m)
        return 0.5 * (x + 1), 0.5 * w
    k = np.arange(m, dtype=np.float64)
    if method == "riemann_right":
        return (k + 1) / m, np.full(m, 1 / m)
    if method == "riemann_left":
        return k / m, np.full(m, 1 / m)
    if method == "riemann_middle":
        return (k + 0.5) / m, np.full(m, 1 / m)
    if method == "riemann_trapezoid":
        w = np.full(m, 1 / (m - 1))
        w[[0, -1]] /= 2
        return k / (m - 1), w
    raise InputError(f"method: unknown integration method {method!r}")


class IntegratedGradients(InputGradientExplainer):
    """Integrated gradients (Sundararajan et al., ICML 2017, eq. 1 and its Riemann sum): attribution
    ``(x - x') * int_0^1 dy^c/dx (x' + alpha (x - x')) d alpha`` with baseline ``x'`` (a
    constant image, ``baseline`` in the model's input space: 0 is the black image only for
    unnormalised inputs), the integral approximated with ``steps`` nodes of ``method``
    (default ``riemann_right``, the paper's Riemann sum; ``gausslegendre`` is captum's
    default). Completeness (Proposition 1): the attributions sum to ``y(x) - y(x')`` up to the
    quadrature error. The B x ``steps`` interpolated images run in chunks of ``batch_size``.

    Equals captum's ``IntegratedGradients`` with the same baseline, steps and method, except
    ``riemann_trapezoid``: captum's trapezoid weights ``1/m`` (halved at the ends) on ``m``
    nodes sum to ``(m - 1)/m``; here they sum to 1, so the raw attributions differ by that
    factor and the normalised maps are equal."""

    class Config(InputGradientConfig):
        steps: int = Field(50, ge=2, description="Number of nodes on the straight path (paper: 20-300).")
        method: Literal["riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre"] = \
            Field("riemann_right", description="Quadrature rule (riemann_right = the paper's Riemann sum; "
                  "gausslegendre = captum's default).")
        baseline: float = Field(0.0, description="Constant baseline image value, in the model's input space.")
        batch_size: int = Field(32, ge=1, description="Interpolated images per forward/backward (chunk size).")

    def attributions(self, model: nn.Module, images: torch.Tensor, targets: Targets) -> torch.Tensor:
        cfg = self.config
        fixed = self.clean_targets(model, images, targets)
        alphas, weights = path_weights(cfg.steps, cfg.method)
        b = images.shape[0]
        base = torch.full_like(images, cfg.baseline)
        delta = images - base
        alpha = torch.as_tensor(alphas, dtype=images.dtype, device=images.device)
        weight = torch.as_tensor(weights, dtype=images.dtype, device=images.device)
        jobs_img = torch.arange(b).repeat_interleave(cfg.steps)  # image-major: all steps of image 0 first
        jobs_step = torch.arange(cfg.steps).repeat(b)
        total = torch.zeros_like(images)
        for j in range(0, len(jobs_img), cfg.batch_size):
            rows, steps = jobs_img[j : j + cfg.batch_size], jobs_step[j : j + cfg.batch_size]
            r, s = rows.to(images.device), steps.to(images.device)
            x = base[r] + alpha[s].view(-1, 1, 1, 1) * delta[r]
            grad, _ = self.input_gradient(model, x, target_rows(fixed, rows.tolist()))
            total.index_add_(0, r, weight[s].view(-1, 1, 1, 1) * grad)
        return delta * total


def image_noise(images: torch.Tensor, n: int, noise_level: float, seed: int) -> torch.Tensor:
    """SmoothGrad noise (Smilkov et al. 2017): ``(n, B, C, H, W)``, image ``i``'s
    samples ``sigma_i * randn((n, C, H, W))`` with ``sigma_i = noise_level * (max_i - min_i)``.

    Every image's ``randn`` is the same draw from a CPU ``torch.Generator`` seeded with ``seed``
    (then moved to the images' device): maps are deterministic per call, identical on every
    device, and independent of the batch an image comes in. It equals captum's ``NoiseTunnel``
    noise for a single image after ``torch.manual_seed(seed)`` (one ``torch.normal`` draw of
    shape ``(n, C, H, W)``)."""
    b = images.shape[0]
    flat = images.detach().flatten(1)
    sigma = noise_level * (flat.amax(1) - flat.amin(1))  # (B,)
    draw = torch.randn((n, *images.shape[1:]), generator=torch.Generator().manual_seed(seed), dtype=images.dtype)
    return draw.to(images.device)[:, None] * sigma.view(1, b, 1, 1, 1)


class SmoothGrad(InputGradientExplainer):
    """SmoothGrad (Smilkov et al., 2017, arXiv 1706.03825): the gradient saliency averaged over
    ``n_samples`` noisy copies ``x + N(0, sigma^2)``, ``sigma = noise_level * (max - min)`` of
    each image (the paper's noise level; 10-20 % work well). The per-sample saliency is
    ``|dy^c/dx|`` (``absolute=True``, captum's ``Saliency`` default) or the signed gradient;
    ``nt_type`` as captum's ``NoiseTunnel``: ``smoothgrad`` (mean), ``smoothgrad_sq`` (mean of
    squares), ``vargrad`` (variance). Reduced over channels (``abs-sum``).

    Seeding: see :func:`image_noise` (a CPU generator seeded with ``seed``, the same draw for
    every image): deterministic per call and batch-independent. For one image it equals
    captum's ``NoiseTunnel(Saliency(model)).attribute(x, nt_type, nt_samples=n_samples,
    stdevs=sigma)`` run after ``torch.manual_seed(seed)``. The B x ``n_samples`` noisy images
    run in chunks of ``batch_size``."""

    class Config(InputGradientConfig):
        n_samples: int = Field(50, ge=1, description="Noisy copies per image (paper: about 50).")
        noise_level: float = Field(0.15, ge=0.0, description="Noise std as a fraction of each image's value range.")
        seed: int = Field(0, description="Seed of the CPU noise generator (maps are deterministic given it).")
        absolute: bool = Field(True, description="Per-sample saliency |grad| (captum Saliency default) or grad.")
        nt_type: Literal["smoothgrad", "smoothgrad_sq", "vargrad"] = Field(
            "smoothgrad", description="Mean, mean of squares, or variance over the noisy samples.")
        batch_size: int = Field(32, ge=1, description="Noisy images per forward/backward (chunk size).")

    def attributions(self, model: nn.Module, images: torch.Tensor, targets: Targets) -> torch.Tensor:
        cfg = self.config
        fixed = self.clean_targets(model, images, targets)
        n, b = cfg.n_samples, images.shape[0]
        noise = image_noise(images, n, cfg.noise_level, cfg.seed)
        jobs_img = torch.arange(b).repeat_interleave(n)
        jobs_s = torch.arange(n).repeat(b)
        s1, s2 = torch.zeros_like(images), torch.zeros_like(images)
        for j in range(0, len(jobs_img), cfg.batch_size):
            rows, samples = jobs_img[j : j + cfg.batch_size], jobs_s[j : j + cfg.batch_size]
            r, s = rows.to(images.device), samples.to(images.device)
            grad, _ = self.input_gradient(model, images[r] + noise[s, r], target_rows(fixed, rows.tolist()))
            sal = grad.abs() if cfg.absolute else grad
            s1.index_add_(0, r, sal)
            s2.index_add_(0, r, sal * sal)
        mean, mean_sq = s1 / n, s2 / n
        if cfg.nt_type == "smoothgrad":
            return mean
        if cfg.nt_type == "smoothgrad_sq":
            return mean_sq
        return mean_sq - mean * mean
