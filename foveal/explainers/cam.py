"""The CAM base: target-layer lookup and activation / gradient capture shared by every class
activation map (gradient CAMs in :mod:`.gradient_cams`, score-weighted CAMs in
:mod:`.score_cams`, attention-guided CAM in :mod:`.attention_guided`).

Every CAM explainer reads one *target layer* (a dotted module name, a module, or ``None`` for the
automatic choice described in :meth:`CAMBase.find_layer`), captures its output ``A`` (B, C, h, w)
with a forward hook, and, for the gradient methods, the gradient ``G = dy^c/dA`` of the target
score with ``torch.autograd.grad`` taken to that activation only (the hook swaps the layer output
for a detached leaf, so nothing upstream of the layer is back-propagated and no parameter
``.grad`` is touched). ViT token outputs (B, N, D) are turned into a (B, D, h, w) grid with the
class/register tokens dropped (timm's ``num_prefix_tokens`` when the model has it, else inferred
from the token count and the image aspect ratio), or with a user ``reshape`` function.

``explain`` (from :class:`~foveal.core.explainer.Explainer`) upsamples the raw maps bilinearly
(``align_corners=False``) to the input size and min-max normalises them per image; constant maps
become zeros.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from ..core.config import ComponentConfig
from ..core.errors import InputError
from ..core.explainer import Explainer, SegmentationTarget, Targets, target_scores
from ..core.modules import resolve_layer
from .tokens import tokens_to_grid

Reshape = Callable[[torch.Tensor], torch.Tensor]

#: model -> automatically chosen layer name (see CAMBase.find_layer); weak keys, so models are freed.
_AUTO_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class CAMConfig(ComponentConfig):
    target_layer: str | None = Field(
        None,
        description="Dotted name of the layer whose output is explained (e.g. 'layer4', 'stages.3', "
        "'blocks.11.norm1'); None picks the last convolutional stage automatically (timm "
        "feature_info, blocks[-1].norm1 for ViTs, else the last module with a strided 4-D output).",
    )


class CAMBase(Explainer):
    """Shared machinery: target-layer lookup, activation/gradient capture, token reshaping.

    Besides the config, ``target_layer`` may be given as a module when constructing the class
    directly (``GradCAM(target_layer=model.layer4)``) and ``reshape`` is a function mapping the
    layer output to (B, C, h, w) (applied to activations and gradients alike). Both are plain
    attributes (``explainer.layer``, ``explainer.reshape``) that can be set after
    ``registry.build``; they are not part of the saved config.
    """

    #: output channels (classes) the method needs: a method comparing classes needs at least 2
    min_outputs: ClassVar[int] = 1

    Config = CAMConfig

    def __init__(self, config: Any = None, *, reshape: Reshape | None = None, **overrides: Any) -> None:
        layer = overrides.get("target_layer")
        self.layer: nn.Module | None = None
        if isinstance(layer, nn.Module):
            self.layer = overrides.pop("target_layer")
        super().__init__(config, **overrides)
        self.reshape = reshape

    def attribute(self, model: nn.Module, images: torch.Tensor, targets: Targets, hooks: list) -> torch.Tensor:
        """Raw maps (B, h, w) from :meth:`compute`; a map whose span is below 1e-5 of its largest
        magnitude is float noise around a constant and becomes exactly zero (``explain`` would
        otherwise min-max-stretch the noise into a full-range pattern)."""
        raw = self.compute(model, images, targets, hooks)
        lo, hi = torch.aminmax(raw.detach().flatten(1), dim=1)
        constant = (hi - lo) <= 1e-5 * torch.maximum(lo.abs(), hi.abs())
        return torch.where(constant[:, None, None], 0.0, raw)

    def compute(
        self, model: nn.Module, images: torch.Tensor, targets: Targets, hooks: list
    ) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- target layer ---------------------------------------------------------------------
    def find_layer(self, model: nn.Module, images: torch.Tensor) -> nn.Module:
        """The target layer: ``self.layer`` (a module), else ``config.target_layer`` (a dotted
        name; unknown names raise :class:`InputError` with close matches), else automatic:

        1. a timm ViT-like model (``num_prefix_tokens`` and ``blocks``): ``blocks[-1].norm1``
           (the last block's output only reaches a CLS-token head through the class token, so its
           patch tokens have zero gradient; the input of the last attention is the usual choice);
        2. a timm classifier with ``feature_info``: its last feature stage (``layer4`` for ResNets,
           ``stages.3`` for ConvNeXt, the last pool of ``features`` for VGG, ...);
        3. anything else (torchvision classifiers, segmentation models): one probe forward without
           gradients; the last module to finish with a 4-D output smaller than the input and larger
           than 1 x 1 (``layer4`` of a torchvision ResNet), skipping outputs with as many channels
           as a segmentation output (logit heads). For segmentation models this is the last
           low-resolution decoder feature before the head; pass ``target_layer`` to choose.

        The automatic choice is cached per model (weakly).
        """
        if self.layer is not None:
            return resolve_layer(model, self.layer)
        if self.config.target_layer is not None:
            return resolve_layer(model, self.config.target_layer)
        name = _AUTO_LAYERS.get(model)
        if name is None:
            name = _timm_default_layer(model) or _probe_default_layer(model, images)
            _AUTO_LAYERS[model] = name
        return resolve_layer(model, name)

    # --- capture --------------------------------------------------------------------------
    @contextmanager
    def recorded(
        self, model: nn.Module, images: torch.Tensor, hooks: list, *, gradients: bool
    ) -> Iterator[tuple[nn.Module, torch.Tensor, Any, bool]]:
        """One forward with a hook on the target layer; yields ``(layer, t, output, plain)`` where
        ``t`` is the raw layer output (its first element for tuple / list outputs, ``plain`` is
        False then): a detached leaf that requires grad (``gradients``; the model's output is then
        a function of it, recorded from the layer on only) or a detached clone.

        The forward runs under ``torch.no_grad``; with ``gradients`` the hook switches grad mode
        on at the layer, so nothing upstream of it is recorded (cheaper than a plain forward
        with gradients). The block body runs in that mode (use ``torch.autograd.grad`` there).
        """
        layer = self.find_layer(model, images)
        store: list[torch.Tensor] = []
        plain: list[bool] = []

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            plain.append(isinstance(output, torch.Tensor))
            t = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(t, torch.Tensor):
                raise InputError(
                    f"target layer {type(module).__name__} returned {type(t).__name__}, expected a tensor"
                )
            if not gradients:
                store.append(t.detach().clone())  # clone: later in-place ops must not change it
                return None
            torch.set_grad_enabled(True)  # record the graph from here on only
            leaf = t.detach().requires_grad_(True)
            store.append(leaf)
            return replace_output(output, leaf.clone())  # the model may modify it in place (x += identity)

        handle = layer.register_forward_hook(hook)
        hooks.append(handle)  # removed by explain() whatever happens; also removed below when done
        try:
            with torch.no_grad():
                output = model(images)
                if not store:
                    raise InputError(f"target layer {type(layer).__name__} did not run during the forward pass")
                yield layer, store[-1], output, plain[-1]
        finally:
            handle.remove()

    def capture(
        self, model: nn.Module, images: torch.Tensor, targets: Targets, hooks: list, *, gradients: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """One forward (and, with ``gradients``, one ``autograd.grad`` to the layer output).

        Returns ``(A, G, output)``: activations and gradients as (B, C, h, w) grids (``G`` is None
        without ``gradients``) and the model output (detached). With ``gradients`` the forward runs
        without autograd up to the target layer and records the graph only from the layer on, so
        it costs less than a plain forward with gradients enabled.
        """
        with self.recorded(model, images, hooks, gradients=gradients) as (layer, t, output, _):
            grad = None
            if gradients:
                scores = target_scores(output, targets)
                (grad,) = torch.autograd.grad(scores.sum(), t, allow_unused=True)
                self._check_used(grad, layer)
        act = self.grid(t.detach(), model, images, layer)
        if not gradients:
            return act, None, output
        return act, self.grid(grad, model, images, layer), output.detach()

    def capture_hvp(
        self, model: nn.Module, images: torch.Tensor, targets: Targets, hooks: list
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like :meth:`capture` with gradients, plus the Hessian-vector product ``H A`` of the
        target score with respect to the layer output (``H = d^2 y / dA^2``, the vector being the
        activation itself), by double back-propagation from the layer on. Returns ``(A, G, HA,
        output)`` as grids; ``HA`` is exactly zero where the score is linear in ``A`` (the gradient
        does not depend on ``A``, e.g. ReLU networks scored by a logit). Attention runs with
        PyTorch's math kernel here (the fused scaled-dot-product kernels have no double backward)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]), \
                self.recorded(model, images, hooks, gradients=True) as (layer, t, output, _):
            scores = target_scores(output, targets)
            (grad,) = torch.autograd.grad(scores.sum(), t, create_graph=True, allow_unused=True)
            self._check_used(grad, layer)
            hvp = None
            if grad.requires_grad:
                (hvp,) = torch.autograd.grad(grad, t, grad_outputs=t.detach(), allow_unused=True)
            if hvp is None:
                hvp = torch.zeros_like(t)
        g = self.grid(grad.detach(), model, images, layer)
        return self.grid(t.detach(), model, images, layer), g, self.grid(hvp.detach(), model, images, layer), \
            output.detach()

    @staticmethod
    def _check_used(grad: torch.Tensor | None, layer: nn.Module) -> None:
        if grad is None:
            raise InputError(
                f"the target score does not depend on the target layer {type(layer).__name__}; "
                "choose a layer the output is computed from"
            )

    def grid(self, t: torch.Tensor, model: nn.Module, images: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """Layer output -> (B, C, h, w): ``reshape`` if given, 4-D as is, 3-D tokens to a grid."""
        if self.reshape is not None:
            g = self.reshape(t)
            if not isinstance(g, torch.Tensor) or g.dim() != 4:
                got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                raise InputError(f"reshape: expected a (B, C, h, w) tensor, got {got}")
            return g
        if t.dim() == 4:
            return t
        if t.dim() == 3:
            return tokens_to_grid(t, model, layer, tuple(images.shape[-2:]))
        raise InputError(
            f"target layer output has shape {tuple(t.shape)}; expected (B, C, h, w) feature maps or "
            "(B, N, D) tokens (give reshape=fn for other layouts)"
        )


def replace_output(output: Any, t: torch.Tensor) -> Any:
    """``output`` with its first tensor replaced by ``t`` (tuple and list outputs keep the rest)."""
    if isinstance(output, tuple):
        return (t, *output[1:])
    if isinstance(output, list):
        return [t, *output[1:]]
    return t


# --- targets of perturbed inputs --------------------------------------------------------------

def fixed_targets(output: torch.Tensor, targets: Targets) -> Any:
    """Targets pinned to the *original* prediction, for scoring perturbed inputs.

    ``None`` becomes the top class per image (classification) or a :class:`SegmentationTarget`
    whose region is the original predicted region (segmentation, same category choice as
    ``targets=None`` in core). Ints and tensors become a list of B class indices; sequences and
    batch callables are returned unchanged. Validated on ``output`` (out-of-range classes raise).
    """
    b = output.shape[0]
    if targets is None:
        if output.dim() == 2:
            fixed: Any = output.argmax(1).tolist()
        elif output.dim() == 4 and output.shape[1] == 1:
            fixed = [SegmentationTarget(0, (output[i, 0] > 0).to(output.dtype)) for i in range(b)]
        elif output.dim() == 4:
            pred = output.argmax(1)
            fixed = []
            for i in range(b):
                areas = torch.stack([(pred[i] == c).sum() for c in range(1, output.shape[1])])
                c = int(areas.argmax()) + 1
                fixed.append(SegmentationTarget(c, (pred[i] == c).to(output.dtype)))
        else:
            raise InputError(f"targets=None: expected model output (B, K) or (B, K, H, W), got {tuple(output.shape)}")
    elif isinstance(targets, int):
        fixed = [targets] * b
    elif isinstance(targets, torch.Tensor):
        fixed = [int(targets)] * b if targets.dim() == 0 else targets
    else:
        fixed = targets
    target_scores(output, fixed)  # validate once, on the original output
    return fixed


def target_rows(fixed: Any, index: list[int]) -> Any:
    if callable(fixed) and not isinstance(fixed, torch.Tensor):
        return fixed  # batch callable: applied row-wise to the masked outputs
    seq = fixed.tolist() if isinstance(fixed, torch.Tensor) else list(fixed)
    return [seq[i] for i in index]


# --- layer helpers ----------------------------------------------------------------------------

def _timm_default_layer(model: nn.Module) -> str | None:
    names = {n for n, _ in model.named_modules()}
    blocks = getattr(model, "blocks", None)
    if hasattr(model, "num_prefix_tokens") and isinstance(blocks, nn.Sequential) and len(blocks):
        name = f"blocks.{len(blocks) - 1}.norm1"
        if name in names:
            return name
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and isinstance(info[-1], Mapping):
        name = info[-1].get("module")
        if name in names:
            return name
    return None


def _probe_default_layer(model: nn.Module, images: torch.Tensor) -> str:
    fired: list[tuple[str, tuple[int, ...]]] = []
    handles = []
    h_in, w_in = images.shape[-2:]

    def make(name: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                fired.append((name, tuple(output.shape)))
        return hook

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(make(name)))
        with torch.no_grad():
            out = model(images[:1])
    finally:
        for h in handles:
            h.remove()
    # a segmentation head's logits (as many channels as the output) are the prediction, not features
    logits = out.shape[1] if isinstance(out, torch.Tensor) and out.dim() == 4 else None
    for name, shape in reversed(fired):
        if (len(shape) == 4 and shape[2] * shape[3] > 1 and (shape[2] < h_in or shape[3] < w_in)
                and shape[1] != logits):
            return name
    raise InputError(
        f"target_layer=None: found no layer of {type(model).__name__} with a spatial (B, C, h, w) output; "
        "pass target_layer='...' (and reshape=fn for token outputs)"
    )


