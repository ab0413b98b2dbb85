"""Gradient-weighted CAMs: Grad-CAM, Grad-CAM++, XGrad-CAM, Layer-CAM, SmoothGrad-CAM++ and the
Abs-CAM phase-1 map. Each combines the target layer's activations ``A`` with the gradient
``G = dy^c/dA`` captured by :class:`~foveal.explainers.cam.CAMBase`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..core.explainer import Targets
from .cam import CAMBase, CAMConfig, fixed_targets


class GradientCAMBase(CAMBase):
    def compute(self, model: nn.Module, images: torch.Tensor, targets: Targets, hooks: list) -> torch.Tensor:
        a, g, _ = self.capture(model, images, targets, hooks)
        return self.combine(a, g)

    def combine(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class GradCAM(GradientCAMBase):
    """Grad-CAM (Selvaraju et al., ICCV 2017, eq. 1-2; attention-guided-cam.txt section 3.1,
    eq. 1-3): channel weights ``w_k = mean_ij dy^c/dA^k_ij``, map ``ReLU(sum_k w_k A^k)``.

    Matches captum's ``LayerGradCam`` (``relu_attributions=True``) followed by bilinear upsampling
    and per-image min-max normalisation."""

    def combine(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        w = g.mean(dim=(2, 3), keepdim=True)
        return F.relu((w * a).sum(1))


def gradcampp_weights(a: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, g3: torch.Tensor,
                      relu_grad: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ eq. 19: ``alpha_ij = g2_ij / (2 g2_ij + sum_ab A_ab * g3_ij)``, zero where the
    gradient (or the denominator) is zero; weights ``w_k = sum_ij alpha_ij ReLU(dY/dA_ij)``."""
    sum_a = a.sum(dim=(2, 3), keepdim=True)
    denom = 2 * g2 + sum_a * g3
    ok = (g1 != 0) & (denom != 0)
    alpha = torch.where(ok, g2 / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(g2))
    return (alpha * relu_grad).sum(dim=(2, 3), keepdim=True)


class GradCAMPlusPlus(GradientCAMBase):
    """Grad-CAM++ (Chattopadhay et al., WACV 2018, eq. 19). With the exponential class score
    ``Y = exp(S)`` of section 3.2 the higher derivatives are ``exp(S) g^2`` and ``exp(S) g^3``
    (``g = dS/dA``, piecewise-linear networks), so ``alpha = g^2 / (2 g^2 + sum_ab A_ab g^3)``;
    the positive factor ``exp(S)`` in ``ReLU(dY/dA)`` scales each map uniformly and is dropped
    (it cancels in the min-max normalisation). ``alpha`` is zero where the gradient is zero."""

    def combine(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        g2 = g * g
        w = gradcampp_weights(a, g, g2, g2 * g, F.relu(g))
        return F.relu((w * a).sum(1))


class XGradCAM(GradientCAMBase):
    """XGrad-CAM (Fu et al., BMVC 2020, eq. 9): ``w_k = sum_ij (A^k_ij / sum_ab A^k_ab) g^k_ij``,
    map ``ReLU(sum_k w_k A^k)``; a channel whose activations sum to zero gets weight 0 (the
    reference code adds 1e-7 to the denominator instead)."""

    def combine(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        s = a.sum(dim=(2, 3), keepdim=True)
        safe = torch.where(s != 0, s, torch.ones_like(s))
        w = torch.where(s != 0, (a * g).sum(dim=(2, 3), keepdim=True) / safe, torch.zeros_like(s))
        return F.relu((w * a).sum(1))


class LayerCAM(GradientCAMBase):
    """Layer-CAM (Jiang et al., IEEE TIP 2021, eq. 5-6): per-location weights ``ReLU(g^k_ij)``,
    map ``ReLU(sum_k ReLU(g^k_ij) A^k_ij)``."""

    def combine(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return F.relu((F.relu(g) * a).sum(1))


class AbsCAMInit(GradientCAMBase):
    """Abs-CAM phase 1, the initial saliency map (abs-cam.txt section 3.1, eq. 1-3, "Abs-CAM_init"
    of section 4.1.4): ``W_k = (1/Z) sum_ij |dy^c/dA^k_ij|`` and ``M_0 = S(U(sum_k W_k A^k))``
    with U = bilinear upsampling and S = min-max normalisation (done by ``explain``; no ReLU,
    as in eq. 3)."""

    def combine(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return (g.abs().mean(dim=(2, 3), keepdim=True) * a).sum(1)


class SmoothGradCAMpp(CAMBase):
    """SmoothGrad-CAM++ (Omeiza et al., 2019): Grad-CAM++ (eq. 19) with the first, second and
    third derivatives averaged over ``n_samples`` noisy copies of the input (SmoothGrad,
    Smilkov et al. 2017: Gaussian noise of std ``noise_level * (max - min)`` of each image).
    Activations come from the clean input (as in torchcam); ``ReLU`` is applied to the averaged
    first derivative. ``targets=None`` is the top class of the clean input. The noise is drawn
    from a CPU generator seeded with ``seed``, so maps are reproducible on any device; every image
    of a batch gets the same noise sequence (scaled by its own range), so a batch gives the maps of
    its images explained one by one."""

    class Config(CAMConfig):
        n_samples: int = Field(8, ge=1, description="Number of noisy copies averaged.")
        noise_level: float = Field(
            0.15, ge=0.0, description="Noise std as a fraction of each image's value range (SmoothGrad: 0.1-0.2)."
        )
        seed: int = Field(0, description="Seed of the noise generator (maps are deterministic given it).")

    def compute(self, model: nn.Module, images: torch.Tensor, targets: Targets, hooks: list) -> torch.Tensor:
        a, _, output = self.capture(model, images, targets, hooks, gradients=False)
        fixed = fixed_targets(output, targets)
        gen = torch.Generator(device="cpu").manual_seed(self.config.seed)
        span = (images.flatten(1).amax(1) - images.flatten(1).amin(1)).view(-1, 1, 1, 1)
        sigma = self.config.noise_level * span
        d1 = d2 = d3 = None
        for _ in range(self.config.n_samples):
            noise = torch.randn(images.shape[1:], generator=gen, dtype=images.dtype).to(images.device)
            _, g, _ = self.capture(model, images + sigma * noise, fixed, hooks)
            d1 = g if d1 is None else d1 + g
            g2 = g * g
            d2 = g2 if d2 is None else d2 + g2
            d3 = g2 * g if d3 is None else d3 + g2 * g
        n = self.config.n_samples
        d1, d2, d3 = d1 / n, d2 / n, d3 / n
        w = gradcampp_weights(a, d1, d2, d3, F.relu(d1))
        return F.relu((w * a).sum(1))
