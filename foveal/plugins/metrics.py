"""Metric components: faithfulness and localisation of explanations, segmentation overlap.

Each component wraps the functional code of :mod:`foveal.metrics` and spells out, in its
Config and docstring, every convention the literature disagrees on. ``compute`` returns
per-sample values (B,) (NaN = not counted); ``aggregate`` reduces them. Metrics that support
``averaging="pooled"`` also expose ``statistics(...)`` (per-sample sufficient statistics,
(B, k)) and ``score(...)`` (the dataset value of a batch); their ``aggregate`` takes the
concatenated statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from ..core.config import ComponentConfig
from ..core.errors import InputError
from ..core.explainer import Targets
from ..core.metric import Metric
from ..core.tensors import check_masks
from ..metrics import explanation as E
from ..metrics import localisation as L
from ..registry import hookimpl


# ---------------------------------------------------------------------------------------------
# Explanation faithfulness
# ---------------------------------------------------------------------------------------------
class _PerturbationConfig(ComponentConfig):
    baseline: Literal["zero", "black", "mean", "blur"] = Field(
        "zero", description="Value of removed pixels, in the model's input space: 'zero' (0 after normalisation, "
        "the mean colour for ImageNet-normalised inputs), 'black' (pixel value 0 before normalisation: "
        "-mean/std), 'mean' (each image's channel means), 'blur' (RISE's 11x11 Gaussian blur, sigma 5).")
    mean: tuple[float, ...] = Field(E.IMAGENET_MEAN, description="Per-channel normalisation mean of the "
                                    "inputs (only used by baseline 'black').")
    std: tuple[float, ...] = Field(E.IMAGENET_STD, description="Per-channel normalisation std of the inputs "
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

    def _p(self) -> E.Perturbation:
        c = self.config
        return E.Perturbation(c.baseline, c.mean, c.std, c.blur_kernel_size, c.blur_sigma, c.batch_size, c.progress)


class _AverageConfig(_ScoredConfig):
    keep_fraction: float | None = Field(
        None, ge=0.0, le=1.0, description="None: soft mask = the per-image min-max normalised map (Grad-CAM++, "
        "Opti-CAM, torchcam). A number: binary mask of the top floor(f*H*W) pixels (Abs-CAM 4.2 uses 0.5).")


class _AverageMetric(_ExplanationMetric):
    """Average drop / increase / gain: one function of :mod:`foveal.metrics.explanation`,
    named by the subclass, on the image masked by the explanation."""

    Config = _AverageConfig
    _score: Callable[..., torch.Tensor]

    def compute(self, model: nn.Module, images: torch.Tensor, saliency: torch.Tensor, targets: Targets = None):
        c = self.config
        return type(self)._score(model, images, saliency, targets, output=c.output, keep_fraction=c.keep_fraction,
                                 p=self._p())


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
    _score = E.average_drop


class AverageIncrease(_AverageMetric):
    """Average increase in confidence (Grad-CAM++; attention-guided-cam.txt 4.2.2, eq. 9; ca-stream.txt "AI").

    Per image ``100 * [Y < O]`` (strict: a tie is no increase); its mean is the percentage of
    images whose score rises when only the explanation is shown. Same masking as average drop.
    Higher is better; range [0, 100].
    """

    _score = E.average_increase


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
    _score = E.average_gain


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

    def compute(self, model: nn.Module, images: torch.Tensor, saliency: torch.Tensor, targets: Targets = None):
        c = self.config
        return type(self)._auc(model, images, saliency, targets, steps=c.steps, output=c.output, x_axis=c.x_axis,
                               p=self._p())

    def curve(self, model: nn.Module, images: torch.Tensor, saliency: torch.Tensor, targets: Targets = None):
        """``(fractions (P,), scores (B, P))``."""
        c = self.config
        return type(self)._curve(model, images, saliency, targets, steps=c.steps, output=c.output, p=self._p())


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
    _auc, _curve = E.deletion, E.deletion_curve


class Insertion(_CurveMetric):
    """Insertion (Petsiuk et al., RISE, 2018; abs-cam.txt 4.2; ca-stream.txt section 4 "I").

    Starting from the baseline image (RISE: blurred), the most salient pixels of the original
    are restored ``ceil(H*W/steps)`` per step; the result is the normalised area under the class
    score curve, in [0, 1] for probabilities. Higher is better.
    """

    Config = _InsertionConfig
    _auc, _curve = E.insertion, E.insertion_curve


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

    def compute(self, model: nn.Module, images: torch.Tensor, saliency: torch.Tensor, targets: Targets = None):
        c = self.config
        return E.percentage_in(model, images, saliency, targets, fraction=c.fraction, output=c.output,
                               percent=c.percent, p=self._p())


class _PerturbationAUCConfig(_PerturbationConfig):
    mode: Literal["positive", "negative"] = Field(
        "positive", description="'positive': remove the most relevant pixels first (lower AUC is better); "
        "'negative': the least relevant first (higher is better).")
    fractions: tuple[float, ...] = Field(
        E.CHEFER_FRACTIONS, description="Removed fractions; 0 is the unmodified image (Chefer et al.: 0, 0.1, "
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

    def compute(self, model: nn.Module, images: torch.Tensor, saliency: torch.Tensor, targets: Targets = None):
        c = self.config
        return E.perturbation_auc(model, images, saliency, targets, normalize=c.normalize, mode=c.mode,
                                  fractions=c.fractions, score=c.score, p=self._p())

    def curve(self, model: nn.Module, images: torch.Tensor, saliency: torch.Tensor, targets: Targets = None):
        """``(fractions (P,), values (B, P))``."""
        c = self.config
        return E.perturbation_curve(model, images, saliency, targets, mode=c.mode, fractions=c.fractions,
                                    score=c.score, p=self._p())


# ---------------------------------------------------------------------------------------------
# Pooled averaging support
# ---------------------------------------------------------------------------------------------
class _Pooled(Metric):
    """Metrics whose dataset value may pool counts over images (``averaging="pooled"``).

    ``compute`` still returns per-image values. For the dataset value use
    ``aggregate(torch.cat([m.statistics(...) for each batch]))`` or ``score(...)`` on one batch.
    """

    n_statistics: ClassVar[int] = 0

    def statistics(self, *args: Any) -> torch.Tensor:  # pragma: no cover - abstract in practice
        raise NotImplementedError

    def reduce(self, statistics: torch.Tensor) -> float:  # pragma: no cover - abstract in practice
        raise NotImplementedError

    def score(self, *args: Any) -> float:
        """The dataset value of this batch with the configured averaging."""
        return self.reduce(self.statistics(*args))

    def aggregate(self, per_sample: torch.Tensor) -> float:
        """Per-image values (B,) with ``averaging="per-image"``: their mean over counted samples.
        Statistics (N, k) from :meth:`statistics` (either averaging): the configured reduction."""
        if per_sample.dim() == 2 and per_sample.shape[1] == self.n_statistics:
            return self.reduce(per_sample)
        if self.config.averaging == "pooled":
            raise InputError(
                f"{type(self).__name__} with averaging='pooled' reduces counts, not per-image values: pass "
                f"torch.cat([metric.statistics(...) for each batch]) (shape (N, {self.n_statistics})) to "
                "aggregate(), or use metric.score(...)"
            )
        return super().aggregate(per_sample)


# ---------------------------------------------------------------------------------------------
# Localisation
# ---------------------------------------------------------------------------------------------
class PointingGame(Metric):
    """Pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop", 2016;
    abs-cam.txt 4.3, eq. 6: ``Acc = #Hits / (#Hits + #Misses)``).

    ``compute(saliency (B, H, W), masks (B, H, W)) -> (B,)``: 1 if the map's maximum lies within
    ``tolerance`` pixels (Euclidean, inclusive) of a mask pixel, else 0; NaN (not counted, never
    a hit) for an empty mask. Equal maxima: the first in row-major order. Only the position of
    the maximum matters (invariant to strictly increasing transforms). Higher is better.
    """

    family = "localisation"

    class Config(ComponentConfig):
        tolerance: float = Field(15.0, ge=0, description="Hit tolerance in pixels at the map's resolution "
                                 "(Zhang et al.: 15).")

    def compute(self, saliency: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return L.pointing_game(saliency, masks, self.config.tolerance)


class SaliencySegmentation(_Pooled):
    """Saliency maps as segmentations (Chefer et al. 2021; vit-lrp-affinitynet.txt 5.2, Table 3).

    Each map is min-max normalised and thresholded at its mean (foreground = map > mean); the
    chosen ``quantity`` is pixel accuracy, AP (both channels ``1 - map`` / ``map`` ranked
    together against the one-hot mask, scikit-learn's step-wise AP) or mIoU (mean of the
    background and foreground IoUs). Chefer et al. pool pixel accuracy and IoU counts over the
    dataset (``averaging="pooled"``, the default) and average AP per image ("mAP").
    ``compute(saliency, masks)`` gives per-image values (per-image mIoU averages the classes
    with a non-empty union). Higher is better; all in [0, 1].
    """

    family = "localisation"
    n_statistics = 7

    class Config(ComponentConfig):
        quantity: Literal["pixel-accuracy", "ap", "miou"] = Field(
            "miou", description="Which number: 'pixel-accuracy', 'ap' (its mean is mAP) or 'miou'.")
        averaging: Literal["pooled", "per-image"] = Field(
            "pooled", description="'pooled': sums of counts over images (Chefer et al.); 'per-image': mean of "
            "per-image values. AP is always averaged per image.")

    def compute(self, saliency: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        stats = self.statistics(saliency, masks)
        return L._per_image(stats, self.config.quantity).to(_float_dtype(saliency))

    def statistics(self, saliency: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return L.saliency_segmentation_statistics(saliency, masks)

    def reduce(self, statistics: torch.Tensor) -> float:
        return L.reduce_saliency_segmentation(statistics, self.config.quantity, self.config.averaging)


def _float_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()


# ---------------------------------------------------------------------------------------------
# Segmentation (wrapping foveal.metrics.segmentation)
# ---------------------------------------------------------------------------------------------
def _seg():
    from ..metrics import segmentation

    return segmentation


def _as_prob(predictions: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    masks = check_masks(masks)
    if not isinstance(predictions, torch.Tensor):
        raise InputError(f"predictions: expected a torch.Tensor, got {type(predictions).__name__}")
    if predictions.dim() == 4 and predictions.shape[1] == 1:
        predictions = predictions[:, 0]
    if predictions.shape != masks.shape:
        raise InputError(f"predictions: expected shape {tuple(masks.shape)} to match the masks, got "
                         f"{tuple(predictions.shape)}")
    if predictions.dtype != torch.bool:
        if not predictions.is_floating_point():
            predictions = predictions.float()
        if not bool(torch.isfinite(predictions).all()):
            raise InputError("predictions: expected finite values")
    return predictions, masks.to(predictions.device)


class _OverlapConfig(ComponentConfig):
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="Probabilities >= threshold are foreground "
                             "(bool predictions are used as they are).")
    empty_value: float = Field(1.0, description="Value when prediction and mask are both empty (per image; "
                               "pooled: when all are empty). 1.0: a correct empty prediction; NaN: not counted.")
    averaging: Literal["per-image", "pooled"] = Field(
        "per-image", description="'per-image': mean of per-image scores (PraNet / Polyp-PVT / RTA-Former); "
        "'pooled': one score from intersections and sizes summed over all images.")

    @field_validator("empty_value")
    @classmethod
    def _empty_in_range(cls, v: float) -> float:
        if not (v != v or 0.0 <= v <= 1.0):
            raise ValueError(f"empty_value must be in [0, 1] or NaN, got {v}")
        return v


class _Overlap(_Pooled):
    family = "segmentation"
    n_statistics = 3
    Config = _OverlapConfig
    _index: ClassVar[int] = 0

    def _binary(self, predictions: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pred, masks = _as_prob(predictions, masks)
        return (pred if pred.dtype == torch.bool else pred >= self.config.threshold), masks

    def compute(self, predictions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        pred, gt = self._binary(predictions, masks)
        values = _seg().dice_iou(pred, gt, empty_value=self.config.empty_value)[self._index]
        return values.to(_float_dtype(predictions))

    def statistics(self, predictions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(B, 3) float64: intersection, predicted area, mask area."""
        pred, gt = self._binary(predictions, masks)
        return torch.stack([(pred & gt).flatten(1).sum(1), pred.flatten(1).sum(1), gt.flatten(1).sum(1)], 1).double()


class Dice(_Overlap):
    """Dice similarity coefficient ``2|P n G| / (|P| + |G|)`` (rta-former.txt III.B "DICE").

    ``compute(predictions (B, H, W) probabilities or bool, masks (B, H, W)) -> (B,)``, the
    prediction binarised at ``threshold`` (>=). Both empty: ``empty_value``. ``averaging``:
    per-image mean (the polyp literature) or pooled over images (``aggregate`` of the
    statistics). For the 256-threshold protocol use ``mean-dice``. Higher is better.
    """

    _index = 0

    def reduce(self, statistics: torch.Tensor) -> float:
        s = statistics.double()
        if self.config.averaging == "per-image":
            den = s[:, 1] + s[:, 2]
            v = torch.where(den > 0, 2 * s[:, 0] / den.clamp_min(1), torch.full_like(den, self.config.empty_value))
            v = v[~torch.isnan(v)]
            return float(v.mean()) if v.numel() else float("nan")
        t = s.sum(0)
        den = t[1] + t[2]
        return float(2 * t[0] / den) if den > 0 else float(self.config.empty_value)


class IoU(_Overlap):
    """Intersection over union ``|P n G| / |P u G|`` (Jaccard index; rta-former.txt III.B).

    Same conventions as ``dice`` (threshold >=, ``empty_value`` for empty/empty, per-image or
    pooled averaging). Per image ``Dice = 2 IoU / (1 + IoU)``. Higher is better.
    """

    _index = 1

    def reduce(self, statistics: torch.Tensor) -> float:
        s = statistics.double()
        if self.config.averaging == "per-image":
            den = s[:, 1] + s[:, 2] - s[:, 0]
            v = torch.where(den > 0, s[:, 0] / den.clamp_min(1), torch.full_like(den, self.config.empty_value))
            v = v[~torch.isnan(v)]
            return float(v.mean()) if v.numel() else float("nan")
        t = s.sum(0)
        den = t[1] + t[2] - t[0]
        return float(t[0] / den) if den > 0 else float(self.config.empty_value)


class _MeanConfig(ComponentConfig):
    num_thresholds: int = Field(256, ge=2, description="Thresholds evenly spaced on [0, 1] (PraNet: 256, "
                                "1:-1/255:0 in the MATLAB evaluation).")
    normalize: bool = Field(True, description="Min-max normalise each prediction to [0, 1] first (PraNet / "
                            "Polyp-PVT test scripts).")


class _MeanOverlap(Metric):
    family = "segmentation"
    Config = _MeanConfig
    _index: ClassVar[int] = 0

    def compute(self, predictions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        prob, gt = _as_prob(predictions, masks)
        prob = prob.to(_float_dtype(prob))
        curves = _seg().threshold_curves(prob, gt, num_thresholds=self.config.num_thresholds,
                                         normalize=self.config.normalize)[self._index]
        return curves.mean(1).to(prob.dtype)


class MeanDice(_MeanOverlap):
    """Mean Dice of the polyp-segmentation literature (PraNet, Polyp-PVT; rta-former.txt III.B).

    Per image: Dice at each of ``num_thresholds`` thresholds of the (min-max normalised)
    prediction, averaged over thresholds; the dataset value is the mean over images
    (per-image averaging only: the protocol averages per-image curves). Thresholds
    ``linspace(1, 0, T)``, foreground ``p >= t``; as in PraNet's toolbox a threshold where
    prediction and mask do not overlap scores 0, also when both are empty (see
    :mod:`foveal.metrics.segmentation`). Higher is better.
    """

    _index = 0


class MeanIoU(_MeanOverlap):
    """Mean IoU of the polyp-segmentation literature ("mIoU" in PraNet / RTA-Former tables):
    IoU averaged over ``num_thresholds`` thresholds per image, then over images (the foreground
    IoU, not a mean over classes). Higher is better."""

    _index = 1


@hookimpl
def register_components(register):
    register("average-drop", AverageDrop)
    register("average-increase", AverageIncrease)
    register("average-gain", AverageGain)
    register("insertion", Insertion)
    register("deletion", Deletion)
    register("percentage-in", PercentageIn)
    register("perturbation-auc", PerturbationAUC)
    register("pointing-game", PointingGame)
    register("saliency-segmentation", SaliencySegmentation)
    register("dice", Dice)
    register("iou", IoU)
    register("mean-dice", MeanDice)
    register("mean-iou", MeanIoU)
