"""Gradient-weighted CAMs: Grad-CAM, Grad-CAM++, XGrad-CAM, Layer-CAM, HiResCAM, SmoothGrad-CAM++,
Shapley-CAM, Finer-CAM and the Abs-CAM phase-1 map. Each combines the target layer's activations
``A`` with the gradient ``G = dy^c/dA`` captured by :class:`~foveal.explainers.cam.CAMBase`
(Shapley-CAM also with the Hessian-vector product ``H A``; Finer-CAM changes the score that is
differentiated, not the combination)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..core.errors import InputError
from ..core.explainer import SegmentationTarget, Targets
from .cam import CAMBase, CAMConfig, fixed_targets
from .input_gradients import image_noise


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
        return gradcam_map(a, g)


def gradcam_map(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return F.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1))


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
        return gradcampp_map(a, g)


def gradcampp_map(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    g2 = g * g
    return F.relu((gradcampp_weights(a, g, g2, g2 * g, F.relu(g)) * a).sum(1))


class XGradCAM(GradientCAMBase):
    """XGrad-CAM (Fu et al., BMVC 2020, eq. 9): ``w_k = sum_ij (A^k_ij / sum_ab A^k_ab) g^k_ij``,
    map ``ReLU(sum_k w_k A^k)``; a channel whose activations sum to zero gets weight 0 (the
    reference code adds 1e-7 to the denominator instead)."""

    def combine(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return xgradcam_map(a, g)


def xgradcam_map(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    s = a.sum(dim=(2, 3), keepdim=True)
    safe = torch.where(s != 0, s, torch.ones_like(s))
    w = torch.where(s != 0, (a * g).sum(dim=(2, 3), keepdim=True) / safe, torch.zeros_like(s))
    return F.relu((w * a).sum(1))


class LayerCAM(GradientCAMBase):
    """Layer-CAM (Jiang et al., IEEE TIP 2021, eq. 5-6): per-location weights ``ReLU(g^k_ij)``,
    map ``ReLU(sum_k ReLU(g^k_ij) A^k_ij)``."""

    def combine(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return layercam_map(a, g)


def layercam_map(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return F.relu((F.relu(g) * a).sum(1))


class HiResCAM(GradientCAMBase):
    """HiResCAM (Draelos & Carin, 2020, arXiv 2011.08891, its definition): the gradient multiplies the
    activations element-wise instead of being averaged per channel, ``sum_k dy^c/dA^k (.) A^k``,
    so only locations the score actually depends on are highlighted (for a CNN ending in one
    fully connected layer it equals CAM). ``relu=True`` (default) keeps the positive evidence, as
    pytorch-grad-cam's ``HiResCAM`` (its base class applies the ReLU); ``relu=False`` returns the
    signed map (min-max normalised by ``explain``)."""

    class Config(CAMConfig):
        relu: bool = Field(True, description="ReLU on the summed map (pytorch-grad-cam); False: signed map.")

    def combine(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return hirescam_map(a, g, relu=self.config.relu)


def hirescam_map(a: torch.Tensor, g: torch.Tensor, relu: bool = True) -> torch.Tensor:
    m = (g * a).sum(1)
    return F.relu(m) if relu else m


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
    first derivative. ``targets=None`` is the top class of the clean input.

    Seeding (see :func:`image_noise`): each image's ``n_samples`` noise tensors are drawn at once
    from a CPU generator seeded with ``seed``, the same draw for every image, so a map is
    reproducible on any device and does not depend on the other images in the batch."""

    class Config(CAMConfig):
        n_samples: int = Field(8, ge=1, description="Number of noisy copies averaged.")
        noise_level: float = Field(
            0.15, ge=0.0, description="Noise std as a fraction of each image's value range (SmoothGrad: 0.1-0.2)."
        )
        seed: int = Field(0, description="Seed of the noise generator (maps are deterministic given it).")

    def compute(self, model: nn.Module, images: torch.Tensor, targets: Targets, hooks: list) -> torch.Tensor:
        a, _, output = self.capture(model, images, targets, hooks, gradients=False)
        fixed = fixed_targets(output, targets)
        n = self.config.n_samples
        noise = image_noise(images, n, self.config.noise_level, self.config.seed)  # (n, B, C, H, W)
        d1 = d2 = d3 = None
        for s in range(n):
            _, g, _ = self.capture(model, images + noise[s], fixed, hooks)
            d1 = g if d1 is None else d1 + g
            g2 = g * g
            d2 = g2 if d2 is None else d2 + g2
            d3 = g2 * g if d3 is None else d3 + g2 * g
        d1, d2, d3 = d1 / n, d2 / n, d3 / n
        w = gradcampp_weights(a, d1, d2, d3, F.relu(d1))
        return F.relu((w * a).sum(1))


class ShapleyCAM(CAMBase):
    """Shapley-CAM (Cai et al., 2024, "CAMs as Shapley Value-based Explainers", arXiv 2501.06261):
    the channel weights come from a second-order Taylor expansion of the utility around the
    activations, ``w_k = mean_ij (dy/dA - 1/2 H A)^k_ij`` with ``H A`` the Hessian-vector
    product of the score with respect to the layer output (computed by double back-propagation
    from the target layer on), map ``ReLU(sum_k w_k A^k)``; this is the formula of the authors'
    code, merged into pytorch-grad-cam as ``ShapleyCAM``.

    ``utility="target"`` (default) differentiates the same score as every other explainer (the
    class logit, a callable, a segmentation region). Where the score is linear in ``A`` (ReLU
    networks scored by a logit at the last stage: ``H A = 0``) Shapley-CAM equals Grad-CAM;
    the paper's ReST utility ``y_c - CE(y, c) = y_c + log softmax(y)_c`` (``utility="rest"``,
    pytorch-grad-cam's ``ClassifierOutputReST``) adds the softmax curvature. ReST needs class
    indices (or ``None``) on a (B, K) classifier output."""

    class Config(CAMConfig):
        utility: Literal["target", "rest"] = Field(
            "target", description="'target': the targets' own score; 'rest': ReST, y_c + log softmax(y)_c.",
        )

    def compute(self, model: nn.Module, images: torch.Tensor, targets: Targets, hooks: list) -> torch.Tensor:
        if self.config.utility == "rest":
            targets = ReSTTarget(class_indices(targets, images.shape[0], "shapley-cam utility='rest'"))
        a, g, ha, _ = self.capture_hvp(model, images, targets, hooks)
        w = (g - 0.5 * ha).mean(dim=(2, 3), keepdim=True)
        return F.relu((w * a).sum(1))


def class_indices(targets: Targets, b: int, who: str) -> list[int] | None:
    """``None`` or B class indices from an int, an integer tensor or a sequence of ints; any
    other target (callables, :class:`SegmentationTarget`) raises :class:`InputError`."""
    if targets is None:
        return None
    if isinstance(targets, bool) or (callable(targets) and not isinstance(targets, torch.Tensor)):
        raise InputError(f"{who}: expected class indices (an int, a tensor or a list of ints) or None, "
                         f"got {type(targets).__name__}")
    if isinstance(targets, int):
        return [targets] * b
    if isinstance(targets, torch.Tensor):
        if targets.is_floating_point() or targets.dim() > 1:
            raise InputError(f"{who}: expected an int tensor of shape ({b},), got {tuple(targets.shape)} "
                             f"{targets.dtype}")
        return [int(targets)] * b if targets.dim() == 0 else [int(t) for t in targets]
    out = []
    for t in targets:
        if isinstance(t, torch.Tensor) and t.dim() == 0 and not t.is_floating_point():
            t = int(t)
        if not isinstance(t, int) or isinstance(t, bool):
            raise InputError(f"{who}: expected class indices, got an element of type {type(t).__name__}")
        out.append(t)
    if len(out) != b:
        raise InputError(f"targets: expected {b} targets (one per image), got {len(out)}")
    return out


def _check_classes(output: torch.Tensor, classes: torch.Tensor, who: str) -> None:
    k = output.shape[1]
    bad = (classes < 0) | (classes >= k)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise InputError(f"targets[{i}]: class {int(classes[i])} out of range for a model with {k} outputs ({who})")


class ReSTTarget:
    """Residual Softmax Target-class utility (Cai et al. 2024): ``y_c - CE(y, c) = y_c + log
    softmax(y)_c`` per image, for a (B, K) output; ``classes=None`` is the top class."""

    def __init__(self, classes: list[int] | None) -> None:
        self.classes = classes

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        if output.dim() != 2:
            raise InputError(f"shapley-cam utility='rest': expected (B, K) class logits, got {tuple(output.shape)}")
        c = (output.detach().argmax(1) if self.classes is None
             else torch.tensor(self.classes, device=output.device))
        _check_classes(output, c, "ReST")
        c = c[:, None]
        return (output.gather(1, c) + torch.log_softmax(output, 1).gather(1, c))[:, 0]


_FINER_BASES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "grad-cam": gradcam_map, "hirescam": hirescam_map, "grad-cam++": gradcampp_map,
    "xgrad-cam": xgradcam_map, "layer-cam": layercam_map,
}


class FinerCAM(GradientCAMBase):
    """Finer-CAM (Zhang et al., CVPR 2025, arXiv 2501.11309, method section): a gradient CAM of the
    *difference* between the target class and its most similar classes instead of the target
    logit alone, which suppresses the evidence the classes share.

    Score (as in the authors' code, ``FinerWeightedTarget``, and pytorch-grad-cam's
    ``FinerCAM``): the ``n_comparisons`` classes ``d`` whose logits are closest to the target's
    (``|y_d - y_c|``), weighted by their softmax probabilities renormalised over those classes,
    ``s = sum_d p_d (y_c - alpha y_d) / sum_d p_d``; the weights are part of the differentiated
    score (not detached), as in both reference implementations. ``alpha`` is the comparison
    strength (``gamma`` in the paper; 0 gives the base CAM). The gradient of ``s`` feeds the
    ``base`` CAM (Grad-CAM by default; the paper applies the idea to any gradient CAM).

    Targets: ``None`` (top class), class indices (ints, an int tensor, a list), or for a
    segmentation output (B, K, H, W) a :class:`SegmentationTarget` (or a list of them): the
    class scores are then the logits summed over the target's region (its mask, else the
    predicted region of its category; an int target or ``None`` uses the whole image / the
    default category's predicted region), the similarity and the weights use the region means.
    Arbitrary callables cannot be split into classes and raise :class:`InputError`, as does a
    model with a single output. Differences to pytorch-grad-cam: the weights are a softmax over
    the comparison logits (equal to ``p_d / sum p_d``; pytorch-grad-cam adds ``1e-9`` to the
    denominator); a model with fewer than ``n_comparisons + 1`` classes compares with all
    other classes (as theirs)."""

    min_outputs = 2

    class Config(CAMConfig):
        alpha: float = Field(1.0, description="Comparison strength (gamma in the paper); 0 = the base CAM.")
        n_comparisons: int = Field(3, ge=1, description="Most similar classes compared with (pytorch-grad-cam: 3).")
        base: Literal["grad-cam", "hirescam", "grad-cam++", "xgrad-cam", "layer-cam"] = Field(
            "grad-cam", description="Gradient CAM that turns the gradient of the Finer score into a map.")

    def compute(self, model: nn.Module, images: torch.Tensor, targets: Targets, hooks: list) -> torch.Tensor:
        finer = FinerTarget(targets, images.shape[0], self.config.alpha, self.config.n_comparisons)
        a, g, _ = self.capture(model, images, finer, hooks)
        return _FINER_BASES[self.config.base](a, g)


class FinerTarget:
    """The Finer-CAM score as a batch callable (see :class:`FinerCAM`)."""

    def __init__(self, targets: Targets, b: int, alpha: float, n_comparisons: int) -> None:
        self.alpha, self.n = alpha, n_comparisons
        self.b = b
        if isinstance(targets, SegmentationTarget):
            targets = [targets] * b
        if isinstance(targets, Sequence) and not isinstance(targets, str) and any(
                isinstance(t, SegmentationTarget) for t in targets):
            if len(targets) != b or not all(isinstance(t, SegmentationTarget) for t in targets):
                raise InputError(f"finer-cam: expected {b} SegmentationTargets (one per image)")
            self.classes, self.regions = [t.category for t in targets], list(targets)
        else:
            self.classes, self.regions = class_indices(targets, b, "finer-cam"), None

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        k = output.shape[1]
        if k < 2:
            raise InputError("finer-cam compares the target class with similar classes; "
                             f"the model has a single output channel (output shape {tuple(output.shape)})")
        if output.dim() == 2:
            if self.regions is not None:
                raise InputError("finer-cam: SegmentationTarget needs a (B, K, H, W) segmentation output")
            total, mean = output, output
            classes = (output.detach().argmax(1) if self.classes is None
                       else torch.tensor(self.classes, device=output.device))
        elif output.dim() == 4:
            classes, region = self._regions(output)
            total = (output * region[:, None]).flatten(2).sum(2)  # (B, K) class scores in the region
            mean = total / region.flatten(1).sum(1, keepdim=True).clamp_min(1)
        else:
            raise InputError(f"finer-cam: expected (B, K) or (B, K, H, W) output, got {tuple(output.shape)}")
        _check_classes(output, classes, "finer-cam")
        c = classes[:, None]
        dist = (mean.detach() - mean.detach().gather(1, c)).abs()
        dist.scatter_(1, c, float("inf"))  # the target itself is not a comparison class
        comp = dist.topk(min(self.n, k - 1), dim=1, largest=False).indices  # (B, n), most similar first
        w = torch.softmax(mean.gather(1, comp), dim=1)  # p_d / sum_d p_d, differentiable
        return (w * (total.gather(1, c) - self.alpha * total.gather(1, comp))).sum(1)

    def _regions(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, k = output.shape[:2]
        pred = output.detach().argmax(1)
        if self.regions is not None:
            classes = torch.tensor(self.classes, device=output.device)
            masks = []
            for i, t in enumerate(self.regions):
                if t.mask is not None:
                    m = t.mask.to(device=output.device, dtype=output.dtype)
                    m = m[i] if m.dim() == 3 else m
                    if m.shape != output.shape[-2:]:
                        raise InputError(f"SegmentationTarget: mask of shape {tuple(t.mask.shape)} does not match "
                                         f"the output size {tuple(output.shape[-2:])}")
                else:
                    m = (pred[i] == t.category).to(output.dtype)
                masks.append(m)
            return classes, torch.stack(masks)
        if self.classes is not None:  # class indices: whole-image class scores (as target_scores)
            return torch.tensor(self.classes, device=output.device), output.new_ones((b, *output.shape[-2:]))
        areas = torch.stack([(pred == c).flatten(1).sum(1) for c in range(1, k)], 1)
        classes = areas.argmax(1) + 1  # the default target's category (core.default_target)
        return classes, (pred == classes[:, None, None]).to(output.dtype)
