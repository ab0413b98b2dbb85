"""Explainer interface and the target conventions shared by every explainer.

Model outputs: :func:`select_output` reduces whatever a model returns (a tensor, an object with
``.logits`` such as a Hugging Face ``ModelOutput``, a torchvision ``{"out": ...}`` dict, a tuple)
to the logits tensor every target and metric works on. :meth:`Explainer.explain` and the
explanation metrics apply it to the model's output through a temporary forward hook on the
model, so explainers and their hooks see a plain tensor from ``model(x)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, Union

import torch
from torch import nn

from .component import PlainComponent
from .errors import InputError
from .modules import check_input_channels, check_model_dtype, preserved_model_state
from .tensors import check_images, normalize_maps, resize_maps

Target = Union[int, Callable[[torch.Tensor], torch.Tensor]]
Targets = Union[None, int, Sequence[Target], torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]
Selector = Union[None, str, int, Callable[[Any], torch.Tensor]]
AUTO_KEYS = ("logits", "out")


def _describe_output(output: Any) -> str:
    if isinstance(output, Mapping):
        return f"a {type(output).__name__} with keys {list(output.keys())}"
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} of {[type(o).__name__ for o in output]}"
    return f"a {type(output).__name__}"


def select_output(output: Any, selector: Selector = None) -> torch.Tensor:
    """The logits tensor inside a model's output.

    ``selector=None`` (automatic): a tensor as is; a mapping's ``"logits"`` entry, else its
    ``"out"`` entry (Hugging Face ``ModelOutput``; torchvision segmentation models); an object's
    ``.logits`` attribute (dataclass outputs); the first tensor of a tuple or list (models
    returning ``(logits, aux)``, ``return_dict=False``). Anything else is an :class:`InputError`
    naming what the model returned. Explicit selectors: a ``str`` is a mapping key or attribute
    name, an ``int`` an index into a tuple/list, a callable ``f(output) -> Tensor``.
    """
    if selector is None:
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, Mapping):
            for key in AUTO_KEYS:
                if isinstance(output.get(key), torch.Tensor):
                    return output[key]
        elif isinstance(getattr(output, "logits", None), torch.Tensor):
            return output.logits
        elif isinstance(output, (tuple, list)):
            for o in output:
                if isinstance(o, torch.Tensor):
                    return o
        raise InputError(
            f"model output: expected a tensor, an object with .logits, a dict with a 'logits' or 'out' "
            f"tensor, or a tuple holding a tensor; got {_describe_output(output)} (pass output_selector= a key, "
            "an index or a callable returning the logits)"
        )
    check_selector(selector)
    if callable(selector):
        picked = selector(output)
    elif isinstance(selector, int):
        if not isinstance(output, (tuple, list)) or not -len(output) <= selector < len(output):
            raise InputError(f"output_selector={selector}: the model returned {_describe_output(output)}, "
                             "expected a tuple or list with that index")
        picked = output[selector]
    elif isinstance(output, Mapping) and selector in output:
        picked = output[selector]
    elif not isinstance(output, Mapping) and hasattr(output, selector):
        picked = getattr(output, selector)
    else:
        raise InputError(f"output_selector={selector!r}: the model returned {_describe_output(output)}, "
                         f"which has no key or attribute {selector!r}")
    if not isinstance(picked, torch.Tensor):
        raise InputError(f"output_selector={selector!r}: selected a {type(picked).__name__}, expected a tensor")
    return picked


def check_selector(selector: Any) -> None:
    """An :class:`InputError` unless ``selector`` is None, a str, an int or a callable."""
    if selector is None or callable(selector) or (isinstance(selector, (str, int)) and not isinstance(selector, bool)):
        return
    raise InputError(f"output_selector: expected None (automatic), a key (str), an index (int) or a callable, "
                     f"got {type(selector).__name__}")


def install_output_selector(model: nn.Module, selector: Selector = None):
    """Register a forward hook on ``model`` that replaces its output by
    ``select_output(output, selector)``; returns the handle (remove it when done)."""
    check_selector(selector)

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if selector is None and type(output) is torch.Tensor:
            return None  # common case: leave the output alone
        return select_output(output, selector)

    return model.register_forward_hook(hook)


class OutputSelector(nn.Module):
    """``model`` whose forward returns ``select_output(model(x), selector)``.

    For libraries that expect logits from ``model(x)`` (pytorch-grad-cam, captum, Quantus).
    Inside foveal prefer ``explain(..., output_selector=...)`` (or rely on the automatic
    selection): the model keeps its own layer names and attributes, which some explainers
    inspect (layer names here gain the prefix ``model.``).
    """

    def __init__(self, model: nn.Module, selector: Selector = None) -> None:
        super().__init__()
        self.model = model
        self.selector = selector

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return select_output(self.model(*args, **kwargs), self.selector)


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

    ``output`` is the model's output, reduced by :func:`select_output` (automatic rules).
    ``targets`` is ``None`` (top class, see :func:`default_target`), an int (same class for all),
    a sequence / 1-D tensor of B ints or callables, or a callable on the batched output returning
    (B,) scores. Class indices select ``output[:, c]`` (summed over pixels for segmentation
    outputs, i.e. the whole-image class score).
    """
    output = select_output(output)
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

    ``explain(model, images, targets=None, *, output_selector=None) -> Tensor (B, H, W)``:
      * ``model``: any ``nn.Module`` mapping images to logits (B, K) or (B, K, H, W), or to an
        output holding them (``.logits``, a ``"logits"``/``"out"`` entry, a tuple: see
        :func:`select_output`; ``output_selector`` chooses explicitly);
      * ``images``: float (B, C, H, W), finite, on the model's device, of the model's dtype
        (float64 images to a float32 model are an :class:`InputError`, not silently cast);
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

    Grad mode: ``explain`` enables gradients locally, so it works under ``torch.no_grad()`` and
    ``torch.inference_mode()`` (inside which it leaves inference mode for the call and clones the
    images); only a model whose parameters are themselves inference tensors is an error.
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

    def explain(self, model: nn.Module, images: torch.Tensor, targets: Targets = None, *,
                output_selector: Selector = None) -> torch.Tensor:
        """Maps (B, H, W) in [0, 1]; see the class docstring. ``output_selector`` picks the logits
        out of the model's output (:func:`select_output`; ``None`` = automatic)."""
        images = check_images(images, channels=None)
        check_model_dtype(model, images)
        self.check_input(model, images)
        check_selector(output_selector)
        # Gradients are taken locally, whatever the caller's grad mode: under torch.no_grad()
        # enable_grad() suffices; under torch.inference_mode() autograd needs inference mode off
        # and a normal (cloned) copy of inference-mode images.
        inference = torch.is_inference_mode_enabled()
        with torch.inference_mode(False) if inference else nullcontext(), torch.enable_grad():
            x = images.clone() if images.is_inference() else images
            with preserved_model_state(model) as hooks:
                hooks.append(install_output_selector(model, output_selector))
                try:
                    raw = self.attribute(model, x, targets, hooks)
                except RuntimeError as e:
                    if "nference tensor" not in str(e):
                        raise
                    raise InputError(
                        f"{type(self).__name__}: the model's parameters or buffers are inference tensors (created or "
                        "loaded under torch.inference_mode()), which autograd cannot use; build or load the model "
                        "outside inference mode (explain() itself may be called inside it)"
                    ) from None
            raw = raw.detach()
        if raw.dim() != 3 or raw.shape[0] != images.shape[0]:
            raise RuntimeError(f"{type(self).__name__}.attribute returned shape {tuple(raw.shape)}, expected (B, h, w)")
        if not bool(torch.isfinite(raw).all()):
            raise FloatingPointError(f"{type(self).__name__} produced non-finite saliency values")
        return normalize_maps(resize_maps(raw.to(images.dtype), tuple(images.shape[-2:])))

    __call__ = explain
