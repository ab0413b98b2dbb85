"""Helpers for working inside a user's model without leaving traces."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .errors import InputError


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> nn.Module:
    """Return the sub-module named by a dotted path (``"layer4"``, ``"stages.3.blocks.2"``).

    A module object is returned as is after checking it belongs to ``model``. An unknown name
    raises :class:`InputError` listing the closest module names.
    """
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise InputError(f"layer: the given {type(layer).__name__} is not a sub-module of the model")
        return layer
    if not isinstance(layer, str):
        raise InputError(f"layer: expected a dotted module name or nn.Module, got {type(layer).__name__}")
    try:
        found = model.get_submodule(layer) if layer else model  # attribute walk: no full traversal
    except AttributeError:
        found = None
    if isinstance(found, nn.Module):
        return found
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
    if not close:
        close = [n for n in names if layer.split(".")[-1] in n][:5]
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise InputError(
        f"layer: no module named {layer!r} in {type(model).__name__}{hint} "
        f"(list them with [n for n, _ in model.named_modules()])"
    )


def check_input_channels(model: nn.Module, images: torch.Tensor, name: str = "images") -> None:
    """Channel count of ``images`` against the model's first convolution: an
    :class:`InputError` instead of the convolution's own error deep inside the forward."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and images.shape[1] != conv.in_channels:
        raise InputError(
            f"{name}: the model's first convolution expects {conv.in_channels} channels in dim 1 "
            f"(B, C, H, W), got a tensor of shape {tuple(images.shape)}"
        )


def _all_modules(model: nn.Module) -> list[nn.Module]:
    """Every sub-module once (like ``model.modules()``, in another order), without building the
    dotted names ``named_modules`` creates: it runs on every explain, where it is measurable."""
    out = [model]
    seen = {id(model)}
    for module in out:  # breadth first; the list grows while it is walked
        for child in module._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                out.append(child)
    return out


@contextmanager
def preserved_model_state(model: nn.Module, *, eval_mode: bool = True) -> Iterator[list]:
    """Run code on ``model`` and put everything back afterwards, even on exceptions.

    Yields a list; append hook handles (``register_forward_hook`` ...) to it and they are
    removed on exit. Restored on exit: every module's train/eval flag, every parameter's
    ``requires_grad`` and ``.grad`` (so no gradient written inside leaks out).
    """
    modules = _all_modules(model)
    modes = [m.training for m in modules]
    params = [p for m in modules for p in m._parameters.values() if p is not None]  # one traversal
    requires = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    handles: list = []
    try:
        if eval_mode and any(modes):  # Module.__setattr__ is slow: skip models already in eval
            model.eval()
        yield handles
    finally:
        for h in handles:
            h.remove()
        handles.clear()
        # restore only what changed (per-attribute writes cost microseconds each; an explain on a
        # GPU is otherwise bounded by this bookkeeping rather than by the forward)
        for m, training in zip(modules, modes):
            if m.training != training:
                m.training = training
        for p, r, g in zip(params, requires, grads):
            if p.requires_grad != r:
                p.requires_grad_(r)
            if p.grad is not g:
                p.grad = g


def check_model_dtype(model: nn.Module, images: torch.Tensor, name: str = "images") -> None:
    """:class:`InputError` when the floating-point parameters of ``model`` all have one dtype and
    ``images`` have another (float64 or half images to a float32 model).

    Not checked (left to torch): models without parameters, models mixing parameter dtypes
    (ambiguous: which one should the images follow?), and calls inside ``torch.autocast`` for
    the images' device type, where mixed dtypes are the point. The images are never cast
    silently: the dtype decides the precision of the maps and scores returned.
    """
    try:
        if torch.is_autocast_enabled(images.device.type):
            return
    except TypeError:  # pragma: no cover - torch without the device_type argument
        if torch.is_autocast_enabled():
            return
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    if first is None or first.dtype == images.dtype:
        return  # the common case costs one parameter lookup; the full scan only runs on a mismatch
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) == 1:
        (dtype,) = dtypes
        if images.dtype != dtype:
            raise InputError(
                f"{name}: dtype {images.dtype} does not match the model's parameters ({dtype}); convert the "
                f"images with .to({dtype}) or the model with .to({images.dtype})"
            )
