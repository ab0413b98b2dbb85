"""Faithfulness metrics of saliency maps: the model's score on images masked by the map.

Functional, batched and device-agnostic; the metric components at the end of this module wrap
these functions. Conventions shared by every function here:

* **Score** (``output``): ``"probability"`` = softmax over dim 1 of the model output, then the
  target's entry; ``"logit"`` = the raw output entry. Segmentation outputs (B, K, H, W) go
  through the same softmax over K and are reduced by the target (class index: sum over pixels;
  callable: its value), as in :func:`foveal.core.explainer.target_scores`.
* **Class** (``targets``): ``None`` = the class the model predicts on the *unmodified* image,
  kept fixed for every perturbed version (RISE, torchcam, Chefer et al.); otherwise the given
  class indices / callables. For segmentation outputs, ``None`` freezes a
  :class:`~foveal.core.explainer.SegmentationTarget` on the region predicted on the unmodified
  image.
* **Masking space and baseline** (``baseline``): images are perturbed in the space the model
  receives them (after normalisation): a removed pixel becomes ``"zero"`` (0 in that space,
  i.e. the normalisation mean colour for ImageNet-normalised inputs; RISE's deletion and
  Grad-CAM++'s ``E * x``), ``"black"`` (pixel value 0 before normalisation, ``-mean / std``;
  Chefer et al.), ``"mean"`` (each image's per-channel mean) or ``"blur"`` (RISE's Gaussian
  blur: 11x11 kernel, sigma 5, zero padding). All channels of a pixel are removed together.
* **Ranking and ties**: pixels are ranked by decreasing saliency with a *stable* sort, so equal
  values are ranked by increasing row-major index (the top-left one first). Only the order of
  the values matters for rank-based metrics, which are therefore invariant to strictly
  increasing transforms of the map that create no new ties.
* **Counts**: a fraction ``f`` of ``n`` pixels is ``floor(f * n)`` pixels (Chefer et al.'s
  ``int(n * f)``).
* **Model outputs**: reduced to logits by :func:`~foveal.core.explainer.select_output` (a
  tensor, ``.logits``, a ``"logits"``/``"out"`` entry, a tuple's first tensor; keyword
  ``output_selector`` for anything else); images must have the model's parameter dtype.
* The model is left as found (:func:`~foveal.core.modules.preserved_model_state`, eval mode) and
  run under ``torch.no_grad``; inputs are not modified; per-sample results do not depend on
  the batch (each perturbed image is scored on its own row); results are (B,) tensors of the
  images' dtype on their device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache, wraps
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn
from tqdm.auto import tqdm

from ..core.config import ComponentConfig
from ..core.errors import InputError
from ..core.explainer import SegmentationTarget, Selector, Targets, check_selector, install_output_selector
from ..core.metric import Metric
from ..core.modules import check_input_channels, check_model_dtype, preserved_model_state
from ..core.tensors import check_images, check_maps, normalize_maps

Output = Literal["probability", "logit"]
Baseline = Literal["zero", "black", "mean", "blur"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = [
    "Output", "Baseline", "Perturbation", "average_drop", "average_increase", "average_gain",
    "masked_scores", "deletion_curve", "insertion_curve", "deletion", "insertion",
    "curve_auc", "percentage_in", "perturbation_curve", "perturbation_auc", "saliency_ranks",
    "pixel_count", "make_baseline", "rise_blur", "noisy_linear_imputation", "road_curve", "road", "ROAD_FRACTIONS",
]


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------
class Perturbation:
    """How removed pixels are filled: baseline kind, the normalisation needed for ``"black"``,
    RISE's blur parameters, the forward batch size and progress display."""

    def __init__(
        self, baseline: Baseline = "zero", mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD, blur_kernel_size: int = 11, blur_sigma: float = 5.0,
        batch_size: int = 64, progress: bool = False,
    ) -> None:
        if baseline not in ("zero", "black", "mean", "blur"):
            raise InputError(f"baseline: expected 'zero', 'black', 'mean' or 'blur', got {baseline!r}")
        if batch_size < 1:
            raise InputError(f"batch_size: expected a positive integer, got {batch_size}")
        self.baseline, self.mean, self.std = baseline, tuple(mean), tuple(std)
        self.blur_kernel_size, self.blur_sigma = int(blur_kernel_size), float(blur_sigma)
        self.batch_size, self.progress = int(batch_size), bool(progress)


def pixel_count(fraction: float, n: int) -> int:
    """``floor(fraction * n)`` clamped to [0, n] (a tiny epsilon absorbs float error, so that
    ``0.7 * 100`` counts 70 pixels)."""
    return min(n, max(0, int(math.floor(fraction * n + 1e-9))))


def saliency_ranks(saliency: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """Rank of every pixel, (B, H*W) long: 0 = removed/kept first.

    Stable sort: equal values keep row-major order (lower flat index ranks first) both for
    ``descending=True`` (most salient first) and ``descending=False`` (least salient first).
    """
    flat = saliency.flatten(1)
    order = torch.sort(flat, dim=1, descending=descending, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order).contiguous())
    return ranks


@lru_cache(maxsize=8)
def _rise_kernel(size: int, sigma: float) -> tuple[float, ...]:
    """RISE's ``gkern``: a centred delta smoothed by ``scipy.ndimage.gaussian_filter`` (reflect
    mode, truncate 4), which is separable: the 2-D kernel is the outer product of this 1-D one."""
    import numpy as np
    from scipy.ndimage import gaussian_filter1d

    delta = np.zeros(size)
    delta[size // 2] = 1.0
    return tuple(float(v) for v in gaussian_filter1d(delta, sigma))


def rise_blur(images: torch.Tensor, kernel_size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """RISE's insertion substrate: per-channel Gaussian blur with zero padding ``kernel_size // 2``
    (as ``conv2d(x, gkern(11, 5), padding=5)`` in the RISE code)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise InputError(f"blur_kernel_size: expected a positive odd integer, got {kernel_size}")
    k1 = torch.tensor(_rise_kernel(kernel_size, float(sigma)), dtype=images.dtype, device=images.device)
    k2 = torch.outer(k1, k1)
    c = images.shape[1]
    weight = k2.expand(c, 1, kernel_size, kernel_size)
    return F.conv2d(images, weight, padding=kernel_size // 2, groups=c)


def make_baseline(images: torch.Tensor, p: Perturbation) -> torch.Tensor:
    """The image every removed pixel is taken from, same shape as ``images``."""
    if p.baseline == "zero":
        return torch.zeros_like(images)
    if p.baseline == "black":
        c = images.shape[1]
        if len(p.mean) != c or len(p.std) != c:
            raise InputError(
                f"baseline 'black': mean/std have {len(p.mean)}/{len(p.std)} values, images have {c} channels"
            )
        mean = torch.tensor(p.mean, dtype=images.dtype, device=images.device)
        std = torch.tensor(p.std, dtype=images.dtype, device=images.device)
        return ((0.0 - mean) / std)[None, :, None, None].expand_as(images).clone()
    if p.baseline == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images).clone()
    return rise_blur(images, p.blur_kernel_size, p.blur_sigma)


def _check(model: nn.Module, images: torch.Tensor, saliency: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    images = check_images(images, channels=None)
    check_input_channels(model, images)
    saliency = check_maps(saliency, like=images).to(images.device)
    if not saliency.is_floating_point():
        saliency = saliency.to(images.dtype)
    return images, saliency


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if not isinstance(out, torch.Tensor) or out.dim() not in (2, 4):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"model: expected an output tensor (B, K) or (B, K, H, W), got {got}")
    return out


class _Scorer:
    """Per-image targets frozen on the unmodified images, applied to any batch of outputs whose
    rows belong to known samples."""

    def __init__(self, original: torch.Tensor, targets: Targets, output: Output) -> None:
        if output not in ("probability", "logit"):
            raise InputError(f"output: expected 'probability' or 'logit', got {output!r}")
        self.output = output
        b, k = original.shape[:2]
        self.classes: torch.Tensor | None = None
        self.callables: list[Callable[[torch.Tensor], torch.Tensor]] | None = None
        if targets is None:
            if original.dim() == 2:
                self.classes = original.argmax(1)
            else:
                mean = output == "probability"
                self.callables = [self._frozen_segmentation_target(original[i : i + 1], mean) for i in range(b)]
            return
        if isinstance(targets, torch.Tensor):
            if targets.is_floating_point() or targets.dim() > 1:
                raise InputError(f"targets: expected an int or a ({b},) int tensor, got {tuple(targets.shape)} "
                                 f"{targets.dtype}")
            targets = [int(targets)] * b if targets.dim() == 0 else targets.tolist()
        if isinstance(targets, int):
            targets = [targets] * b
        if callable(targets):
            raise InputError("targets: a batched callable cannot be frozen per image; pass one callable per image")
        targets = list(targets)
        if len(targets) != b:
            raise InputError(f"targets: expected {b} targets (one per image), got {len(targets)}")
        if all(not callable(t) for t in targets):
            cls = torch.tensor([int(t) for t in targets], device=original.device)
            if bool(((cls < 0) | (cls >= k)).any()):
                raise InputError(f"targets: class indices {cls.tolist()} out of range for a model with {k} outputs")
            self.classes = cls
        else:
            self.callables = [t if callable(t) else self._class_fn(int(t), k) for t in targets]

    @staticmethod
    def _class_fn(c: int, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
        if not 0 <= c < k:
            raise InputError(f"targets: class {c} out of range for a model with {k} outputs")
        return lambda out: out[:, c].flatten(1).sum(1)

    @staticmethod
    def _frozen_segmentation_target(logits: torch.Tensor, mean: bool) -> SegmentationTarget:
        """The predicted region of the unmodified image (as :func:`default_target`). With
        ``mean`` (probability scores) the region's weights sum to 1, so the score is the mean
        class probability over the region, in [0, 1] (0 for an empty region); with logits it is
        the sum of logits over the region, as the explainers' target."""
        k = logits.shape[1]
        if k == 1:
            region = (logits[0, 0] > 0).to(logits.dtype)
            cat = 0
        else:
            pred = logits.argmax(1)[0]
            areas = torch.stack([(pred == c).sum() for c in range(1, k)])
            cat = int(areas.argmax()) + 1
            region = (pred == cat).to(logits.dtype)
        if mean:
            region = region / region.sum().clamp_min(1)
        return SegmentationTarget(cat, region)

    def activate(self, out: torch.Tensor) -> torch.Tensor:
        """Probabilities: softmax over classes, or the sigmoid of a single-channel (binary
        segmentation) output; logits unchanged."""
        if self.output != "probability":
            return out
        return out.sigmoid() if out.dim() == 4 and out.shape[1] == 1 else out.softmax(dim=1)

    def __call__(self, out: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        act = self.activate(out)
        if self.classes is not None:
            cls = self.classes[samples]
            if act.dim() == 2:
                return act.gather(1, cls[:, None])[:, 0]
            picked = act[torch.arange(act.shape[0], device=act.device), cls].flatten(1)
            return picked.mean(1) if self.output == "probability" else picked.sum(1)
        assert self.callables is not None
        scores = []
        for row, s in enumerate(samples.tolist()):
            v = self.callables[s](act[row : row + 1]).reshape(-1)
            if v.numel() != 1:
                raise InputError(f"targets[{s}]: a per-image callable must return one score, got {v.numel()}")
            scores.append(v[0])
        return torch.stack(scores)

    def correct(self, out: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        """Top-1 correctness (argmax == class) for classification outputs."""
        if self.classes is None or out.dim() != 2:
            raise InputError("score 'accuracy' needs a classifier (B, K) output and class-index targets")
        return (out.argmax(1) == self.classes[samples]).to(out.dtype)


def _original(model: nn.Module, images: torch.Tensor, targets: Targets, output: Output, batch_size: int):
    """``(scorer, scores (B,), outputs)`` of the unmodified images; the scorer freezes the targets."""
    outs = [_run(model, images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    out = torch.cat(outs)
    scorer = _Scorer(out, targets, output)
    samples = torch.arange(images.shape[0], device=images.device)
    return scorer, scorer(out, samples), out


def _scores_of_jobs(
    model: nn.Module, scorer: _Scorer, start: torch.Tensor, finish: torch.Tensor, ranks: torch.Tensor,
    samples: torch.Tensor, counts: torch.Tensor, p: Perturbation, desc: str, accuracy: bool = False,
) -> torch.Tensor:
    """Score one perturbed image per job j: sample ``samples[j]`` with its ``counts[j]`` first-ranked
    pixels taken from ``finish`` and the rest from ``start``. Jobs run in batches of ``p.batch_size``."""
    b, c, h, w = start.shape
    n = samples.shape[0]
    result = torch.empty(n, dtype=start.dtype, device=start.device)
    chunks = range(0, n, p.batch_size)
    for lo in tqdm(chunks, desc=desc, disable=(not p.progress) or None, leave=False):
        s = samples[lo : lo + p.batch_size]
        sel = ranks[s] < counts[lo : lo + p.batch_size, None]
        x = torch.where(sel[:, None], finish[s].flatten(2), start[s].flatten(2)).view(-1, c, h, w)
        out = _run(model, x)
        result[lo : lo + p.batch_size] = scorer.correct(out, s) if accuracy else scorer(out, s).to(start.dtype)
    return result


def _guarded(fn):
    """Run ``fn(model, images, ...)`` with the model in eval mode, restored afterwards, without
    grads, its outputs reduced to logits by :func:`~foveal.core.explainer.select_output`
    (keyword ``output_selector``, automatic by default), images of the model's dtype."""

    @wraps(fn)
    def wrapper(model: nn.Module, *args, output_selector: Selector = None, **kwargs):
        images = args[0] if args else kwargs.get("images")
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            check_model_dtype(model, images)
        check_selector(output_selector)
        with preserved_model_state(model) as hooks, torch.no_grad():
            hooks.append(install_output_selector(model, output_selector))
            return fn(model, *args, **kwargs)

    return wrapper


# --------------------------------------------------------------------------------------------
# Average drop / increase / gain (Grad-CAM++; attention-guided-cam.txt 4.2.1-4.2.2;
# ca-stream.txt section 4 after Opti-CAM)
# --------------------------------------------------------------------------------------------
@_guarded
def masked_scores(
    model: nn.Module, images: torch.Tensor, saliency: torch.Tensor, targets: Targets = None, *,
    output: Output = "probability", keep_fraction: float | None = None, p: Perturbation | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``(Y, O)``, each (B,): on the images and on the images masked by the explanation.

    The mask ``E`` is the per-image min-max normalised map (soft mask, Grad-CAM++ / Opti-CAM /
    torchcam; a constant map gives ``E = 0``) or, with ``keep_fraction``, the binary mask of
    the top ``floor(keep_fraction * H * W)`` pixels (Abs-CAM 4.2 uses 50%). The masked image
    is ``E * x + (1 - E) * baseline``; with the default ``"zero"`` baseline this is ``E * x``.
    """
    p = p or Perturbation()
    images, saliency = _check(model, images, saliency)
    scorer, y, _ = _original(model, images, targets, output, p.batch_size)
    if keep_fraction is None:
        e = normalize_maps(saliency.to(images.dtype))
    else:
        if not 0.0 <= keep_fraction <= 1.0:
            raise InputError(f"keep_fraction: expected a value in [0, 1], got {keep_fraction}")
        k = pixel_count(keep_fraction, saliency[0].numel())
        e = (saliency_ranks(saliency) < k).view_as(saliency).to(images.dtype)
    base = make_baseline(images, p)
    masked = e[:, None] * images + (1 - e[:, None]) * base
    samples = torch.arange(images.shape[0], device=images.device)
    o = torch.cat([scorer(_run(model, masked[i : i + p.batch_size]), samples[i : i + p.batch_size])
                   for i in range(0, images.shape[0], p.batch_size)])
    return y.to(images.dtype), o.to(images.dtype)


def average_drop(model, images, saliency, targets=None, **kw) -> torch.Tensor:
    """Per-image drop in %: ``100 * max(0, Y - O) / Y`` (attention-guided-cam.txt eq. 8,
    Grad-CAM++ sec. 4). NaN (not counted) where ``Y <= 0`` (possible with logits only).
    torchcam divides by ``Y + 1e-7`` instead; the difference is below 1e-5 %."""
    y, o = masked_scores(model, images, saliency, targets, **kw)
    return torch.where(y > 0, 100.0 * (y - o).clamp_min(0) / y.clamp_min(torch.finfo(y.dtype).tiny),
                       torch.full_like(y, float("nan")))


def average_increase(model, images, saliency, targets=None, **kw) -> torch.Tensor:
    """Per-image increase indicator in %: ``100 * [Y < O]`` (eq. 9; its mean over images is the
    "percent increase in confidence"). Strict: equal scores are no increase."""
    y, o = masked_scores(model, images, saliency, targets, **kw)
    return 100.0 * (y < o).to(y.dtype)


def average_gain(model, images, saliency, targets=None, **kw) -> torch.Tensor:
    """Per-image gain in %: ``100 * max(0, O - Y) / (1 - Y)`` (Opti-CAM, used by CA-Stream
    section 4), defined for probabilities only; 0 where ``Y == 1`` (no gain possible)."""
    if kw.get("output", "probability") != "probability":
        raise InputError("average gain needs output='probability' (it divides by 1 - Y)")
    y, o = masked_scores(model, images, saliency, targets, **kw)
    room = 1 - y
    return torch.where(room > 0, 100.0 * (o - y).clamp_min(0) / room.clamp_min(torch.finfo(y.dtype).tiny),
                       torch.zeros_like(y))


# --------------------------------------------------------------------------------------------
# Insertion / deletion (RISE, Petsiuk et al. 2018; abs-cam.txt 4.2; ca-stream.txt section 4)
# --------------------------------------------------------------------------------------------
def _step_counts(n: int, steps: int) -> list[int]:
    """RISE's schedule: ``s = ceil(n / steps)`` pixels per step, counts 0, s, 2s, ..., n."""
    if steps < 1:
        raise InputError(f"steps: expected a positive integer, got {steps}")
    s = -(-n // steps)
    return [*range(0, n, s), n]


def _curve(model, images, saliency, targets, steps, output, p, mode):
    images, saliency = _check(model, images, saliency)
    b, _, h, w = images.shape
    n = h * w
    counts = _step_counts(n, steps)
    scorer, y, _ = _original(model, images, targets, output, p.batch_size)
    ranks = saliency_ranks(saliency)
    base = make_baseline(images, p)
    # Points that need a forward: deletion skips count 0 (the image), insertion skips count n.
    inner = counts[1:] if mode == "deletion" else counts[:-1]
    start, finish = (images, base) if mode == "deletion" else (base, images)
    dev = images.device
    samples = torch.arange(b, device=dev).repeat_interleave(len(inner))
    jobs = torch.tensor(inner, device=dev).repeat(b)
    scores = _scores_of_jobs(model, scorer, start, finish, ranks, samples, jobs, p, mode).view(b, len(inner))
    y = y.to(images.dtype)[:, None]
    curve = torch.cat([y, scores], 1) if mode == "deletion" else torch.cat([scores, y], 1)
    fractions = torch.tensor(counts, dtype=torch.float64, device=dev) / n
    return fractions, curve


@_guarded
def deletion_curve(model, images, saliency, targets=None, *, steps: int = 224, output: Output = "probability",
                   p: Perturbation | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fractions (P,), scores (B, P))``: the score as the most salient pixels are replaced by
    the baseline (default ``"zero"``, RISE's ``torch.zeros_like`` substrate), ``ceil(HW/steps)``
    pixels per step, from the unmodified image (fraction 0) to the all-baseline image (1)."""
    return _curve(model, images, saliency, targets, steps, output, p or Perturbation("zero"), "deletion")


@_guarded
def insertion_curve(model, images, saliency, targets=None, *, steps: int = 224, output: Output = "probability",
                    p: Perturbation | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fractions (P,), scores (B, P))``: the score as the most salient pixels are restored
    into the baseline image (default ``"blur"``, RISE's blurred substrate), from the
    all-baseline image (fraction 0) to the unmodified image (1)."""
    return _curve(model, images, saliency, targets, steps, output, p or Perturbation("blur"), "insertion")


def curve_auc(curve: torch.Tensor, fractions: torch.Tensor, x_axis: Literal["step", "fraction"] = "step"
              ) -> torch.Tensor:
    """Area under (B, P) curves, normalised so that a constant curve ``c`` has area ``c``.

    ``"step"``: points equally spaced on [0, 1] (RISE's ``auc``: ``(sum - y0/2 - yP/2) / (P - 1)``);
    ``"fraction"``: trapezoid against the actually perturbed fraction (torchcam). They agree
    when ``steps`` divides the number of pixels.
    """
    if x_axis == "step":
        x = torch.linspace(0, 1, curve.shape[1], dtype=torch.float64, device=curve.device)
    elif x_axis == "fraction":
        x = fractions.to(device=curve.device, dtype=torch.float64)
    else:
        raise InputError(f"x_axis: expected 'step' or 'fraction', got {x_axis!r}")
    return torch.trapezoid(curve.double(), x, dim=1).to(curve.dtype)


def deletion(model, images, saliency, targets=None, *, steps: int = 224, output: Output = "probability",
             x_axis: Literal["step", "fraction"] = "step", p: Perturbation | None = None,
             output_selector: Selector = None) -> torch.Tensor:
    """Deletion AUC per image (lower is better); see :func:`deletion_curve` and :func:`curve_auc`."""
    f, c = deletion_curve(model, images, saliency, targets, steps=steps, output=output, p=p,
                          output_selector=output_selector)
    return curve_auc(c, f, x_axis)


def insertion(model, images, saliency, targets=None, *, steps: int = 224, output: Output = "probability",
              x_axis: Literal["step", "fraction"] = "step", p: Perturbation | None = None,
              output_selector: Selector = None) -> torch.Tensor:
    """Insertion AUC per image (higher is better); see :func:`insertion_curve` and :func:`curve_auc`."""
    f, c = insertion_curve(model, images, saliency, targets, steps=steps, output=output, p=p,
                           output_selector=output_selector)
    return curve_auc(c, f, x_axis)


# --------------------------------------------------------------------------------------------
# Percentage in (attention-guided-cam.txt 4.2 and 4.2.3)
# --------------------------------------------------------------------------------------------
@_guarded
def percentage_in(model, images, saliency, targets=None, *, fraction: float = 0.25, output: Output = "probability",
                  percent: bool = True, p: Perturbation | None = None) -> torch.Tensor:
    """The model's score on the image with only its top ``floor(fraction * H * W)`` pixels kept
    (the map set to 1 there and 0 elsewhere, multiplied point-wise with the image, i.e. the
    ``"zero"`` baseline), in percent of the probability when ``percent`` (logits are returned
    as they are)."""
    p = p or Perturbation("zero")
    if not 0.0 <= fraction <= 1.0:
        raise InputError(f"fraction: expected a value in [0, 1], got {fraction}")
    images, saliency = _check(model, images, saliency)
    b, _, h, w = images.shape
    scorer, _, _ = _original(model, images, targets, output, p.batch_size)
    samples = torch.arange(b, device=images.device)
    counts = torch.full((b,), pixel_count(fraction, h * w), device=images.device)
    s = _scores_of_jobs(model, scorer, make_baseline(images, p), images, saliency_ranks(saliency), samples,
                        counts, p, "percentage-in")
    return s * 100.0 if percent and output == "probability" else s


# --------------------------------------------------------------------------------------------
# Positive / negative perturbation (Chefer et al. 2021; vit-lrp-affinitynet.txt 5.2)
# --------------------------------------------------------------------------------------------
CHEFER_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@_guarded
def perturbation_curve(
    model, images, saliency, targets=None, *, mode: Literal["positive", "negative"] = "positive",
    fractions: Sequence[float] = CHEFER_FRACTIONS, score: Literal["accuracy", "probability"] = "accuracy",
    p: Perturbation | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fractions (P,), values (B, P))``: top-1 correctness (or probability) of the class as the
    ``floor(f * H * W)`` most (``"positive"``) or least (``"negative"``) relevant pixels are set to
    the baseline (default ``"black"``: 0 in pixel space, as Chefer et al. zero the [0, 1] image
    before normalising). Fraction 0 is the unmodified image ("for x=0 we used the accuracy of
    the network", Chefer, issue #31 of their repository). Negative ranks by increasing relevance,
    ties again by increasing row-major index."""
    p = p or Perturbation("black")
    if mode not in ("positive", "negative"):
        raise InputError(f"mode: expected 'positive' or 'negative', got {mode!r}")
    fr = [float(f) for f in fractions]
    if not fr or any(not 0.0 <= f <= 1.0 for f in fr) or any(b <= a for a, b in zip(fr, fr[1:])):
        raise InputError(f"fractions: expected increasing values in [0, 1], got {list(fractions)}")
    images, saliency = _check(model, images, saliency)
    b, _, h, w = images.shape
    scorer, y, out0 = _original(model, images, targets, "probability", p.batch_size)
    accuracy = score == "accuracy"
    dev = images.device
    y0 = scorer.correct(out0, torch.arange(b, device=dev)) if accuracy else y
    counts = [pixel_count(f, h * w) for f in fr]
    inner = [c for c in counts if c > 0]
    ranks = saliency_ranks(saliency, descending=(mode == "positive"))
    samples = torch.arange(b, device=dev).repeat_interleave(len(inner))
    jobs = torch.tensor(inner, device=dev, dtype=torch.long).repeat(b)
    vals = _scores_of_jobs(model, scorer, images, make_baseline(images, p), ranks, samples, jobs, p,
                           f"{mode} perturbation", accuracy=accuracy).view(b, len(inner))
    n_zero = len(counts) - len(inner)
    curve = torch.cat([y0.to(images.dtype)[:, None].expand(b, n_zero), vals], 1)
    return torch.tensor(fr, dtype=torch.float64, device=dev), curve


def perturbation_auc(model, images, saliency, targets=None, *, normalize: bool = False, **kw) -> torch.Tensor:
    """Per-image ``np.trapz(values, fractions)`` (Chefer et al.; the mean over images equals the
    trapezoid of the mean accuracy curve, their reported number / 100). Not normalised by
    default: with the default fractions 0..0.9 the range is [0, 0.9]; ``normalize`` divides by
    the fraction span so the range is [0, 1]."""
    f, c = perturbation_curve(model, images, saliency, targets, **kw)
    if len(f) < 2:
        raise InputError("fractions: the AUC needs at least two fractions")
    area = torch.trapezoid(c.double(), f, dim=1)
    if normalize:
        area = area / float(f[-1] - f[0])
    return area.to(c.dtype)


# ---------------------------------------------------------------------------------------------
# Explanation faithfulness
# ---------------------------------------------------------------------------------------------
class _PerturbationConfig(ComponentConfig):
    baseline: Literal["zero", "black", "mean", "blur"] = Field(
        "zero", description="Value of removed pixels, in the model's input space: 'zero' (0 after normalisation, "
        "the mean colour for ImageNet-normalised inputs), 'black' (pixel value 0 before normalisation: "
        "-mean/std), 'mean' (each image's channel means), 'blur' (RISE's 11x11 Gaussian blur, sigma 5).")
    mean: tuple[float, ...] = Field(IMAGENET_MEAN, description="Per-channel normalisation mean of the "
                                    "inputs (only used by baseline 'black').")
    std: tuple[float, ...] = Field(IMAGENET_STD, description="Per-channel normalisation std of the inputs "
                                   "(only used by baseline 'black').")
    blur_kernel_size: int = Field(11, gt=0, description="Kernel size of the 'blur' baseline (odd).")
    blur_sigma: float = Field(5.0, gt=0, description="Gaussian sigma of the 'blur' baseline.")
    batch_size: int = Field(64, gt=0, description="Perturbed images per model forward.")
    progress: bool = Field(False, description="Show a tqdm progress bar over forward batches (on terminals).")

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(s <= 0 for s in v):
            raise ValueError(f"std must be positive, got {v}")
        return v


class _ScoredConfig(_PerturbationConfig):
    output: Literal["probability", "logit"] = Field(
        "probability", description="Score of the class: softmax probability over dim 1 ('probability') or the "
        "raw model output ('logit').")


class _ExplanationMetric(Metric):
    """``compute(model, images (B, C, H, W), saliency (B, H, W), targets=None) -> (B,)``.

    Shared conventions (see :mod:`foveal.metrics.explanation`): ``targets=None`` is the class
    predicted on the unmodified image, kept for every perturbed copy; pixels are ranked by
    decreasing saliency with ties broken by increasing row-major index (stable sort); images
    are masked in the model's input space; the model is left as found and run without grads.
    """

    family = "explanation"
    Config = _ScoredConfig

    def _p(self) -> Perturbation:
        c = self.config
        return Perturbation(c.baseline, c.mean, c.std, c.blur_kernel_size, c.blur_sigma, c.batch_size, c.progress)


class _AverageConfig(_ScoredConfig):
    keep_fraction: float | None = Field(
        None, ge=0.0, le=1.0, description="None: soft mask = the per-image min-max normalised map (Grad-CAM++, "
        "Opti-CAM, torchcam). A number: binary mask of the top floor(f*H*W) pixels (Abs-CAM 4.2 uses 0.5).")


class _AverageMetric(_ExplanationMetric):
    """Average drop / increase / gain: one function of :mod:`foveal.metrics.explanation`,
    named by the subclass, on the image masked by the explanation."""

    Config = _AverageConfig
    _score: Callable[..., torch.Tensor]

    def compute(self, model: nn.Module, images: torch.Tensor, saliency: torch.Tensor, targets: Targets = None, *,
                output_selector: Selector = None):
        c = self.config
        return type(self)._score(model, images, saliency, targets, output=c.output, keep_fraction=c.keep_fraction,
                                 p=self._p(), output_selector=output_selector)


class AverageDrop(_AverageMetric):
    """Average drop (Chattopadhyay et al., Grad-CAM++, 2018; attention-guided-cam.txt 4.2.1, eq. 8;
    abs-cam.txt 4.2; ca-stream.txt section 4 "AD").

    Per image ``100 * max(0, Y - O) / Y`` in percent, where ``Y`` is the class score on the image
    and ``O`` on the image masked by the explanation ``E * x + (1 - E) * baseline`` (default:
    soft mask, ``"zero"`` baseline, i.e. ``E * x`` on the normalised tensor, softmax
    probabilities). Lower is better; range [0, 100] for probabilities. NaN where ``Y <= 0``
    (logits only). torchcam's ``ClassificationMetric`` divides by ``Y + 1e-7``.
    """

    higher_is_better = False
    _score = average_drop


class AverageIncrease(_AverageMetric):
    """Average increase in confidence (Grad-CAM++; attention-guided-cam.txt 4.2.2, eq. 9; ca-stream.txt "AI").

    Per image ``100 * [Y < O]`` (strict: a tie is no increase); its mean is the percentage of
    images whose score rises when only the explanation is shown. Same masking as average drop.
    Higher is better; range [0, 100].
    """

    _score = average_increase


class _GainConfig(_AverageConfig):
    output: Literal["probability"] = Field(
        "probability", description="Average gain divides by 1 - Y, so it is defined for softmax probabilities only.")


class AverageGain(_AverageMetric):
    """Average gain (Zhang et al., Opti-CAM, 2023; ca-stream.txt section 4 "AG").

    Per image ``100 * max(0, O - Y) / (1 - Y)`` in percent with softmax probabilities (0 where
    ``Y == 1``); the counterpart of average drop. Same masking as average drop. Higher is
    better; range [0, 100].
    """

    Config = _GainConfig
    _score = average_gain


class _CurveConfig(_ScoredConfig):
    steps: int = Field(224, gt=0, description="Number of perturbation steps N: ceil(H*W/N) pixels per step, "
                       "N+1 curve points when N divides H*W (RISE: 224 pixels per step at 224x224 = 224 steps).")
    x_axis: Literal["step", "fraction"] = Field(
        "step", description="AUC abscissa: 'step' = points equally spaced on [0, 1] (RISE's auc); 'fraction' = "
        "the actually perturbed fraction of pixels (torchcam). Identical when N divides H*W.")


class _DeletionConfig(_CurveConfig):
    baseline: Literal["zero", "black", "mean", "blur"] = Field(
        "zero", description="Value deleted pixels take (RISE: zeros of the normalised tensor, 'zero').")


class _InsertionConfig(_CurveConfig):
    baseline: Literal["zero", "black", "mean", "blur"] = Field(
        "blur", description="Image insertion starts from (RISE: the blurred image, 'blur'; torchcam: 'zero').")


class _CurveMetric(_ExplanationMetric):
    """Deletion / insertion: the AUC (``compute``) and the curve itself (``curve``) from the
    functions of :mod:`foveal.metrics.explanation` a subclass names."""

    _auc: Callable[..., torch.Tensor]
    _curve: Callable[..., tuple[torch.Tensor, torch.Tensor]]

    def compute(self, model: nn.Module, images: torch.Tensor, saliency: torch.Tensor, targets: Targets = None, *,
                output_selector: Selector = None):
        c = self.config
        return type(self)._auc(model, images, saliency, targets, steps=c.steps, output=c.output, x_axis=c.x_axis,
                               p=self._p(), output_selector=output_selector)

    def curve(self, model: nn.Module, images: torch.Tensor, saliency: torch.Tensor, targets: Targets = None, *,
              output_selector: Selector = None):
        """``(fractions (P,), scores (B, P))``."""
        c = self.config
        return type(self)._curve(model, images, saliency, targets, steps=c.steps, output=c.output, p=self._p(),
                                 output_selector=output_selector)


class Deletion(_CurveMetric):
    """Deletion (Petsiuk et al., RISE, 2018; abs-cam.txt 4.2; ca-stream.txt section 4 "D").

    The most salient pixels are replaced by the baseline, ``ceil(H*W/steps)`` per step, and the
    class score (softmax probability by default) is recorded from the unmodified image to the
    all-baseline image; the result is the area under that curve normalised to [0, 1] on the
    x axis (so in [0, 1] for probabilities). Lower is better. Each image costs ``steps``
    perturbed forwards plus one on the unmodified image, batched across images and steps.
    """

    Config = _DeletionConfig
    higher_is_better = False
    _auc, _curve = deletion, deletion_curve


class Insertion(_CurveMetric):
    """Insertion (Petsiuk et al., RISE, 2018; abs-cam.txt 4.2; ca-stream.txt section 4 "I").

    Starting from the baseline image (RISE: blurred), the most salient pixels of the original
    are restored ``ceil(H*W/steps)`` per step; the result is the normalised area under the class
    score curve, in [0, 1] for probabilities. Higher is better.
    """

    Config = _InsertionConfig
    _auc, _curve = insertion, insertion_curve


class _PercentageInConfig(_ScoredConfig):
    fraction: float = Field(0.25, ge=0.0, le=1.0, description="Fraction of pixels kept (the paper's Table 4 "
                            "uses 0.05, 0.1, 0.2, 0.25, 0.5; Figure 6 shows 0.25).")
    percent: bool = Field(True, description="Report the probability x 100 (percent, as Table 4); ignored for "
                          "output='logit'.")


class PercentageIn(_ExplanationMetric):
    """Percentage in (attention-guided-cam.txt 4.2 and 4.2.3, Table 4).

    The map is turned into a binary mask of its top ``floor(fraction*H*W)`` pixels (1) and the
    rest (0), multiplied point-wise with the image (the ``"zero"`` baseline, in the model's input
    space), and the model's score of the class on that image is reported (softmax probability
    in percent by default). Higher is better.
    """

    Config = _PercentageInConfig

    def compute(self, model: nn.Module, images: torch.Tensor, saliency: torch.Tensor, targets: Targets = None, *,
                output_selector: Selector = None):
        c = self.config
        return percentage_in(model, images, saliency, targets, fraction=c.fraction, output=c.output,
                             percent=c.percent, p=self._p(), output_selector=output_selector)


class _PerturbationAUCConfig(_PerturbationConfig):
    mode: Literal["positive", "negative"] = Field(
        "positive", description="'positive': remove the most relevant pixels first (lower AUC is better); "
        "'negative': the least relevant first (higher is better).")
    fractions: tuple[float, ...] = Field(
        CHEFER_FRACTIONS, description="Removed fractions; 0 is the unmodified image (Chefer et al.: 0, 0.1, "
        "..., 0.9).")
    score: Literal["accuracy", "probability"] = Field(
        "accuracy", description="Curve values: top-1 correctness of the class (Chefer et al.) or its probability.")
    normalize: bool = Field(False, description="Divide the AUC by the fraction span (range [0, 1] instead of "
                            "[0, 0.9] for the default fractions).")
    baseline: Literal["zero", "black", "mean", "blur"] = Field(
        "black", description="Removed pixels are set to 0 in [0, 1] pixel space before normalisation (Chefer et "
        "al.), i.e. 'black' with the given mean/std.")

    @model_validator(mode="after")
    def _check_fractions(self) -> _PerturbationAUCConfig:
        f = self.fractions
        if len(f) < 2 or any(not 0 <= v <= 1 for v in f) or any(b <= a for a, b in zip(f, f[1:])):
            raise ValueError(f"fractions must be at least two increasing values in [0, 1], got {f}")
        return self


class PerturbationAUC(_ExplanationMetric):
    """Positive / negative perturbation AUC (Chefer et al., "Transformer Interpretability Beyond
    Attention Visualization", 2021; vit-lrp-affinitynet.txt 5.2, Table 2).

    Pixels are set to black in order of decreasing (positive) or increasing (negative) relevance,
    ``floor(f*H*W)`` for each fraction ``f``; the value at each fraction is the top-1 correctness
    of the class (``targets=None``: the prediction on the unmodified image, "predicted"; class
    labels: "target"); the per-image result is ``np.trapz(values, fractions)`` as the authors
    compute it (their tables show the mean x 100). Per-image AUCs average to the AUC of the mean
    accuracy curve. Ties: stable order, increasing row-major index first, in both modes.
    """

    Config = _PerturbationAUCConfig

    @property
    def higher_is_better(self) -> bool:  # type: ignore[override]
        return self.config.mode == "negative"

    def compute(self, model: nn.Module, images: torch.Tensor, saliency: torch.Tensor, targets: Targets = None, *,
                output_selector: Selector = None):
        c = self.config
        return perturbation_auc(model, images, saliency, targets, normalize=c.normalize, mode=c.mode,
                                fractions=c.fractions, score=c.score, p=self._p(), output_selector=output_selector)

    def curve(self, model: nn.Module, images: torch.Tensor, saliency: torch.Tensor, targets: Targets = None, *,
              output_selector: Selector = None):
        """``(fractions (P,), values (B, P))``."""
        c = self.config
        return perturbation_curve(model, images, saliency, targets, mode=c.mode, fractions=c.fractions,
                                  score=c.score, p=self._p(), output_selector=output_selector)


# --------------------------------------------------------------------------------------------
# ROAD: remove and debias (Rong et al., "A Consistent and Efficient Evaluation Strategy for
# Attribution Methods", ICML 2022)
# --------------------------------------------------------------------------------------------
ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# The imputation neighbourhood of the authors' code: the 8 neighbours, 1/6 for the four sharing
# an edge and 1/12 for the four diagonal ones ((row, column) offsets).
_ROAD_NEIGHBOURS = (((-1, -1), 1 / 12), ((-1, 0), 1 / 6), ((-1, 1), 1 / 12), ((0, -1), 1 / 6),
                    ((0, 1), 1 / 6), ((1, -1), 1 / 12), ((1, 0), 1 / 6), ((1, 1), 1 / 12))


def _imputation_system(removed):
    """Sparse system of the noisy linear imputation of one (H, W) bool numpy mask.

    Unknowns are the removed pixels (row-major). Each unknown equals the weighted mean of its
    in-image neighbours: ``L u = K x`` with ``L = D - W_removed`` (D the sum of the in-image
    weights; symmetric positive definite as long as a pixel is kept) and ``K`` the weights of
    the kept neighbours. Returns ``(L (m, m) csc, K (m, H*W) csr, index (m,))``."""
    import numpy as np
    from scipy.sparse import csc_matrix, csr_matrix

    h, w = removed.shape
    index = np.flatnonzero(removed.ravel())
    m = index.size
    var = np.full(h * w, -1, dtype=np.int64)
    var[index] = np.arange(m)
    r, c = np.divmod(index, w)
    diag = np.zeros(m)
    lr, lc, lv, kr, kc, kv = [], [], [], [], [], []
    for (dy, dx), weight in _ROAD_NEIGHBOURS:
        rr, cc = r + dy, c + dx
        inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        eq = np.flatnonzero(inside)
        nb = rr[inside] * w + cc[inside]
        diag[eq] += weight
        v = var[nb]
        unknown = v >= 0
        lr.append(eq[unknown])
        lc.append(v[unknown])
        lv.append(np.full(int(unknown.sum()), -weight))
        kr.append(eq[~unknown])
        kc.append(nb[~unknown])
        kv.append(np.full(int((~unknown).sum()), weight))
    ar = np.arange(m)
    lap = csc_matrix((np.concatenate([*lv, diag]), (np.concatenate([*lr, ar]), np.concatenate([*lc, ar]))),
                     shape=(m, m))
    known = csr_matrix((np.concatenate(kv), (np.concatenate(kr), np.concatenate(kc))), shape=(m, h * w))
    return lap, known, index


def noisy_linear_imputation(image: torch.Tensor, removed: torch.Tensor, noise: float = 0.01,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """ROAD's noisy linear imputation of one image (Rong et al., ICML 2022).

    ``image`` (C, H, W), ``removed`` (H, W) bool. Every removed pixel becomes the weighted mean
    of its 8 neighbours (1/6 edge, 1/12 diagonal; neighbours outside the image are left out and
    the weights of the rest renormalised), removed neighbours being unknowns too: one sparse
    linear system per image (scipy's SuperLU, float64; the authors' code, pytorch-grad-cam and
    Quantus solve the same system with ``spsolve``), all channels solved at once. Then
    Gaussian noise of standard deviation ``noise`` (absolute, in the image's units) is added to
    the imputed pixels: one float32 ``torch.randn((C, m))`` draw (m removed pixels in row-major
    order) from ``generator`` (or torch's global generator), the draw pytorch-grad-cam makes, so
    that the same seed gives the same noise. Kept pixels are unchanged. Returns a new (C, H, W) tensor of the
    image's dtype and device. Removing every pixel leaves nothing to impute from: an
    :class:`InputError`.
    """
    import numpy as np
    from scipy.sparse.linalg import splu

    if image.dim() != 3 or removed.shape != image.shape[-2:]:
        raise InputError(f"noisy_linear_imputation: expected image (C, H, W) and removed (H, W), got "
                         f"{tuple(image.shape)} and {tuple(removed.shape)}")
    mask = removed.detach().to("cpu", torch.bool).numpy()
    if mask.all():
        raise InputError("noisy_linear_imputation: every pixel is removed; at least one must be kept to impute from")
    out = image.detach().clone()
    if not mask.any():
        return out
    c = image.shape[0]
    lap, known, index = _imputation_system(mask)
    pixels = image.detach().to("cpu", torch.float64).reshape(c, -1).numpy().T  # (H*W, C)
    # L is symmetric positive definite: SuperLU in symmetric mode (minimum degree on L + L^T, no
    # pivoting) is exact to float64 rounding and 10-25% faster than spsolve's default at 224 px.
    lu = splu(lap, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
    solution = np.asarray(lu.solve(np.ascontiguousarray(known @ pixels))).reshape(index.size, c)
    values = torch.from_numpy(solution).to(image.dtype).t()  # (C, m)
    if noise:
        z = torch.randn((c, index.size), dtype=torch.float32, generator=generator)
        values = values + noise * z.to(image.dtype)
    flat = out.view(c, -1)
    flat[:, torch.from_numpy(index).to(out.device)] = values.to(out.device)
    return out


def _road_removed(saliency, fraction: float, order: str, selection: str, ranks=None):
    """(H*W,) bool numpy: the pixels removed at ``fraction`` for one (H*W,) map."""
    import numpy as np

    if selection == "rank":
        return ranks < pixel_count(fraction, ranks.size)
    # pytorch-grad-cam's percentile threshold (np.percentile, linear interpolation): its
    # ``percentile`` argument is the kept percentage, 100 * (1 - fraction); ties at the
    # threshold are all removed. LeRF mirrors MoRF on the negated map.
    values = saliency if order == "morf" else -saliency
    return values >= np.percentile(values, round(100.0 * (1.0 - fraction), 9))


@_guarded
def road_curve(
    model, images, saliency, targets=None, *, order: Literal["morf", "lerf", "combined"] = "morf",
    fractions: Sequence[float] = ROAD_FRACTIONS, score: Literal["accuracy", "probability", "logit"] = "accuracy",
    difference: bool = False, noise: float = 0.01, seed: int | None = 0,
    selection: Literal["rank", "threshold"] = "rank", batch_size: int = 64, progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fractions (P,), values (B, P))``: ROAD (Rong et al., ICML 2022) curves.

    For each fraction ``f`` the pixels ranked first (``"morf"``: most relevant first;
    ``"lerf"``: least relevant first) are removed and re-filled by
    :func:`noisy_linear_imputation`, and the class (frozen on the unmodified image) is scored:
    top-1 correctness (``"accuracy"``, the paper's and Quantus' measure), softmax probability or
    logit (pytorch-grad-cam's ``ClassifierOutputSoftmaxTarget`` / ``ClassifierOutputTarget``).
    ``difference`` subtracts the unmodified image's score (pytorch-grad-cam's default).
    ``"combined"`` is ``(lerf - morf) / 2`` (pytorch-grad-cam's ``ROADCombined``).

    ``selection="rank"``: ``floor(f * H * W)`` pixels by the stable rank of the map (ties in
    row-major order), as Quantus and the authors' code count them; ``"threshold"``: every pixel
    at or beyond the ``f``-quantile threshold of the map (pytorch-grad-cam). A selection that
    removes every pixel (a constant map with ``"threshold"``) gives NaN. ``f = 0`` with
    ``"rank"`` is the unmodified image. Noise: a generator seeded with ``seed`` at the start of
    each image's curve (so a sample's value does not depend on the batch), drawn in fraction
    order; ``seed=None`` draws from torch's global generator. One linear solve per image and
    fraction (on the CPU), forwards in chunks of ``batch_size`` perturbed images.
    """
    import numpy as np

    if order not in ("morf", "lerf", "combined"):
        raise InputError(f"order: expected 'morf', 'lerf' or 'combined', got {order!r}")
    if score not in ("accuracy", "probability", "logit"):
        raise InputError(f"score: expected 'accuracy', 'probability' or 'logit', got {score!r}")
    if selection not in ("rank", "threshold"):
        raise InputError(f"selection: expected 'rank' or 'threshold', got {selection!r}")
    fr = [float(f) for f in fractions]
    if not fr or any(not 0.0 <= f < 1.0 for f in fr) or any(b <= a for a, b in zip(fr, fr[1:])):
        raise InputError(f"fractions: expected increasing values in [0, 1) (removed fraction of pixels), got "
                         f"{list(fractions)}")
    if not (math.isfinite(noise) and noise >= 0):
        raise InputError(f"noise: expected a non-negative standard deviation, got {noise}")
    if batch_size < 1:
        raise InputError(f"batch_size: expected a positive integer, got {batch_size}")
    images, saliency = _check(model, images, saliency)
    b, c, h, w = images.shape
    dev, dtype = images.device, images.dtype
    scorer, y, out0 = _original(model, images, targets, "logit" if score == "logit" else "probability", batch_size)
    everything = torch.arange(b, device=dev)
    y0 = (scorer.correct(out0, everything) if score == "accuracy" else y).to(dtype)
    orders = ("morf", "lerf") if order == "combined" else (order,)
    curves = {o: torch.empty(b, len(fr), dtype=dtype, device=dev) for o in orders}
    flat_maps = saliency.detach().flatten(1).cpu()
    # Jobs in (order, image, fraction) order: each image's noise generator advances fraction by fraction.
    jobs: list[tuple[str, int, int, np.ndarray]] = []
    for o in orders:
        ranks = saliency_ranks(saliency, descending=(o == "morf")).cpu().numpy() if selection == "rank" else None
        for i in range(b):
            for j, f in enumerate(fr):
                removed = _road_removed(flat_maps[i].numpy(), f, o, selection, None if ranks is None else ranks[i])
                if not removed.any():
                    curves[o][i, j] = y0[i]
                elif removed.all():
                    curves[o][i, j] = float("nan")
                else:
                    jobs.append((o, i, j, removed.reshape(h, w)))
    generators: dict[tuple[str, int], torch.Generator | None] = {}
    cpu_images = images.detach().cpu()
    chunks = range(0, len(jobs), batch_size)
    for lo in tqdm(chunks, desc=f"road ({order})", disable=(not progress) or None, leave=False):
        chunk = jobs[lo : lo + batch_size]
        batch = []
        for o, i, _, removed in chunk:
            if (o, i) not in generators:
                generators[(o, i)] = None if seed is None else torch.Generator().manual_seed(int(seed))
            batch.append(noisy_linear_imputation(cpu_images[i], torch.from_numpy(removed), noise, generators[(o, i)]))
        x = torch.stack(batch).to(dev)
        samples = torch.tensor([i for _, i, _, _ in chunk], device=dev)
        out = _run(model, x)
        vals = scorer.correct(out, samples) if score == "accuracy" else scorer(out, samples)
        for (o, i, j, _), v in zip(chunk, vals.to(dtype)):
            curves[o][i, j] = v
    if difference:
        curves = {o: v - y0[:, None] for o, v in curves.items()}
    values = (curves["lerf"] - curves["morf"]) / 2 if order == "combined" else curves[order]
    return torch.tensor(fr, dtype=torch.float64, device=dev), values


def road(model, images, saliency, targets=None, **kw) -> torch.Tensor:
    """Per-image ROAD summary (B,): the mean of :func:`road_curve` over the fractions
    (pytorch-grad-cam's ``AveragerAcrossThresholds``; for equally spaced fractions the
    normalised area under the curve). NaN where a point of the curve is undefined."""
    _, values = road_curve(model, images, saliency, targets, **kw)
    return values.mean(1)


class _ROADConfig(ComponentConfig):
    order: Literal["morf", "lerf", "combined"] = Field(
        "morf", description="'morf': remove the most relevant pixels first (lower is better); 'lerf': the least "
        "relevant first (higher is better); 'combined': (lerf - morf) / 2 (higher is better).")
    fractions: tuple[float, ...] = Field(
        ROAD_FRACTIONS, description="Removed fractions of the pixels, increasing, in [0, 1) (pytorch-grad-cam's "
        "percentile = 100 * (1 - f); Quantus' percentages = 100 * f).")
    score: Literal["accuracy", "probability", "logit"] = Field(
        "accuracy", description="Value at each fraction: top-1 correctness of the class (Rong et al., Quantus), its "
        "softmax probability or its logit (pytorch-grad-cam's targets).")
    difference: bool = Field(False, description="Subtract the unmodified image's value (pytorch-grad-cam's "
                             "return_diff=True).")
    noise: float = Field(0.01, ge=0, description="Standard deviation of the Gaussian noise added to imputed pixels, "
                         "in the model's input space (Rong et al., pytorch-grad-cam and Quantus: 0.01).")
    seed: int | None = Field(0, description="Seed of each image's noise generator; None: torch's global generator.")
    selection: Literal["rank", "threshold"] = Field(
        "rank", description="'rank': floor(f*H*W) pixels by stable rank (Quantus, the authors' code); 'threshold': "
        "the pixels beyond the map's percentile threshold, ties included (pytorch-grad-cam).")
    batch_size: int = Field(64, gt=0, description="Imputed images per model forward.")
    progress: bool = Field(False, description="Show a tqdm progress bar over forward batches (on terminals).")

    @model_validator(mode="after")
    def _check_fractions(self) -> _ROADConfig:
        f = self.fractions
        if not f or any(not 0 <= v < 1 for v in f) or any(b <= a for a, b in zip(f, f[1:])):
            raise ValueError(f"fractions must be increasing values in [0, 1), got {f}")
        return self


class ROAD(Metric):
    """ROAD, RemOve And Debias (Rong et al., "A Consistent and Efficient Evaluation Strategy for
    Attribution Methods", ICML 2022).

    Removal-based faithfulness without the class-information leakage of constant baselines:
    at each removed fraction of pixels (most relevant first, MoRF, or least relevant first,
    LeRF) the removed pixels are re-filled by noisy linear imputation (each the weighted mean
    of its 8 neighbours, solved jointly as one sparse linear system per image, plus Gaussian
    noise of std 0.01 in the model's input space) and the model scores the frozen class.
    ``compute`` returns the per-image mean over the fractions, ``curve`` the values per
    fraction. Defaults: MoRF, fractions 0.1, ..., 0.9, top-1 correctness (the paper's
    accuracy curves; its mean over images is Quantus' per-percentage accuracy). Lower is better
    for MoRF, higher for LeRF and ``combined``.

    Equal to pytorch-grad-cam's ``ROADMostRelevantFirst(Average)`` / ``ROADLeastRelevantFirst``
    / ``ROADCombined`` with ``selection="threshold"``, ``difference=True`` and
    ``score="probability"`` or ``"logit"`` (fraction ``f`` is their percentile ``100 (1 - f)``;
    with the same seed and noise for one image), and to Quantus' ``ROAD`` with the defaults
    (noise 0: Quantus draws from numpy's global generator). See docs/metrics.md for every
    convention where the three differ.
    """

    family = "explanation"
    Config = _ROADConfig

    @property
    def higher_is_better(self) -> bool:  # type: ignore[override]
        return self.config.order != "morf"

    def _kw(self) -> dict:
        c = self.config
        return dict(order=c.order, fractions=c.fractions, score=c.score, difference=c.difference, noise=c.noise,
                    seed=c.seed, selection=c.selection, batch_size=c.batch_size, progress=c.progress)

    def compute(self, model: nn.Module, images: torch.Tensor, saliency: torch.Tensor, targets: Targets = None, *,
                output_selector: Selector = None) -> torch.Tensor:
        return road(model, images, saliency, targets, output_selector=output_selector, **self._kw())

    def curve(self, model: nn.Module, images: torch.Tensor, saliency: torch.Tensor, targets: Targets = None, *,
              output_selector: Selector = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(fractions (P,), values (B, P))``."""
        return road_curve(model, images, saliency, targets, output_selector=output_selector, **self._kw())
