"""Explainer interface and the target conventions shared by every explainer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch import nn

from .component import PlainComponent
from .errors import InputError
from .modules import check_input_channels, preserved_model_state
from .tensors import check_images, normalize_maps, resize_maps

Target = Union[int, Callable[[torch.Tensor], torch.Tensor]]
Targets = Union[None, int, Sequence[Target], torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


class SegmentationTarget:
    """Score of a segmentation output: sum of one class's logits inside a region.

    ``output`` is (B, K, H, W) logits. ``mask`` is a (H, W) or (B, H, W) region; ``None`` uses
    the model's own predicted region of ``category`` (sigmoid > 0.5 when K == 1, argmax == category
    otherwise), the usual way of explaining a segmenter's prediction (as in pytorch-grad-cam's
    SemanticSegmentationTarget). Returns (B,) scores.
    """

    def __init__(self, category: int = 0, mask: torch.Tensor | None = None) -> None:
        self.category = int(category)
        self.mask = mask

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        if output.dim() != 4:
            raise InputError(f"SegmentationTarget: expected (B, K, H, W) logits, got shape {tuple(output.shape)}")
        k = output.shape[1]
        if not 0 <= self.category < k:
            raise InputError(f"SegmentationTarget: category {self.category} out of range for {k} classes")
        logits = output[:, self.category]
        if self.mask is not None:
            mask = self.mask.to(device=output.device, dtype=output.dtype)
            if mask.shape[-2:] != logits.shape[-2:]:
                raise InputError(
                    f"SegmentationTarget: mask of shape {tuple(mask.shape)} does not match the output "
                    f"size {tuple(logits.shape[-2:])}"
                )
        elif k == 1:
            mask = (logits.detach() > 0).to(output.dtype)
        else:
            mask = (output.detach().argmax(1) == self.category).to(output.dtype)
        return (logits * mask).flatten(1).sum(1)


def default_target(output: torch.Tensor) -> torch.Tensor:
    """Scores for ``targets=None``: the top class per image.

    Classification (B, K): the largest logit. Segmentation (B, K, H, W): for K == 1 the foreground
    logits summed over the predicted region; for K > 1 the non-background class (channel 0 is
    background) with the largest predicted area, its logits summed over that area.
    """
    if output.dim() == 2:
        return output.gather(1, output.detach().argmax(1, keepdim=True))[:, 0]
    if output.dim() == 4:
        if output.shape[1] == 1:
            return SegmentationTarget(0)(output)
        pred = output.detach().argmax(1)
        areas = torch.stack([(pred == c).flatten(1).sum(1) for c in range(1, output.shape[1])], 1)
        cats = areas.argmax(1) + 1
        scores = [SegmentationTarget(int(c))(output[i : i + 1])[0] for i, c in enumerate(cats)]
        return torch.stack(scores)
    raise InputError(f"targets=None: expected model output (B, K) or (B, K, H, W), got {tuple(output.shape)}")


def target_scores(output: torch.Tensor, targets: Targets) -> torch.Tensor:
    """Reduce a model output to one differentiable score per image, shape (B,).

    ``targets`` is ``None`` (top class, see :func:`default_target`), an int (same class for all),
    a sequence / 1-D tensor of B ints or callables, or a callable on the batched output returning
    (B,) scores. Class indices select ``output[:, c]`` (summed over pixels for segmentation
    outputs, i.e. the whole-image class score).
    """
    b = output.shape[0]
    if targets is None:
        return default_target(output)
    if callable(targets) and not isinstance(targets, torch.Tensor):
        scores = targets(output)
        if not isinstance(scores, torch.Tensor) or scores.shape != (b,):
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise InputError(f"targets: a callable target must return a ({b},) tensor of scores, got {got}")
        return scores
    if isinstance(targets, torch.Tensor):
        if targets.dim() == 0:
            targets = [int(targets)] * b
        elif targets.dim() == 1 and not targets.is_floating_point():
            targets = targets.tolist()
        else:
            raise InputError(
                f"targets: expected an int tensor of shape ({b},), got {tuple(targets.shape)} {targets.dtype}"
            )
    if isinstance(targets, int):
        targets = [targets] * b
    targets = list(targets)
    if len(targets) != b:
        raise InputError(f"targets: expected {b} targets (one per image), got {len(targets)}")
    k = output.shape[1]
    scores = []
    for i, t in enumerate(targets):
        if callable(t):
            s = t(output[i : i + 1])
            s = s.reshape(-1)
            if s.numel() != 1:
                raise InputError(f"targets[{i}]: a per-image callable must return one score, got {s.numel()}")
            scores.append(s[0])
        else:
            c = int(t)
            if not 0 <= c < k:
                raise InputError(f"targets[{i}]: class {c} out of range for a model with {k} outputs")
            scores.append(output[i, c].sum())
    return torch.stack(scores)


class Explainer(PlainComponent, ABC):
    """Saliency explainer.

    ``explain(model, images, targets=None) -> Tensor (B, H, W)``:
      * ``model``: any ``nn.Module`` mapping images to logits (B, K) or (B, K, H, W);
      * ``images``: float (B, C, H, W), finite, on the model's device;
      * ``targets``: see :func:`target_scores` (class indices, a tensor, callables such as
        :class:`SegmentationTarget`, or ``None`` for the top class);
      * returns float maps in [0, 1] (per-image min-max; constant maps become 0) at the input's
        H, W, dtype and device, detached; an image's map does not depend on the other images of
        the batch.

    Bad input (a tensor that is not a (B, C, H, W) float batch, NaN/Inf, a channel count the
    model's first convolution does not take, an out-of-range class target) raises
    :class:`~foveal.core.errors.InputError`; class-agnostic methods check ``targets`` too.

    The model is left as found: hooks removed (even on exceptions), train/eval flags and
    ``requires_grad`` restored, no parameter ``.grad`` written. Subclasses implement
    :meth:`attribute` returning raw non-normalised (B, h, w) maps; :meth:`explain` validates,
    guards the model, resizes bilinearly to the input size and normalises.
    """

    kind = "explainer"

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        self._init_config(config, overrides)

    @abstractmethod
    def attribute(
        self, model: nn.Module, images: torch.Tensor, targets: Targets, hooks: list
    ) -> torch.Tensor:
        """Raw maps (B, h, w). Runs inside :func:`preserved_model_state`; append hook handles
        to ``hooks`` so they are removed whatever happens."""

    def check_input(self, model: nn.Module, images: torch.Tensor) -> None:
        """Channel count against the model's first convolution (clearer than a conv error);
        override for models whose first convolution does not read the images."""
        check_input_channels(model, images)

    def explain(self, model: nn.Module, images: torch.Tensor, targets: Targets = None) -> torch.Tensor:
        images = check_images(images, channels=None)
        self.check_input(model, images)
        with preserved_model_state(model) as hooks:
            raw = self.attribute(model, images, targets, hooks)
        raw = raw.detach()
        if raw.dim() != 3 or raw.shape[0] != images.shape[0]:
            raise RuntimeError(f"{type(self).__name__}.attribute returned shape {tuple(raw.shape)}, expected (B, h, w)")
        if not bool(torch.isfinite(raw).all()):
            raise FloatingPointError(f"{type(self).__name__} produced non-finite saliency values")
        return normalize_maps(resize_maps(raw.to(images.dtype), tuple(images.shape[-2:])))

    __call__ = explain
