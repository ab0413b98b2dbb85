"""Checks for component authors (bundled and third-party plugins).

``check_component(name, **overrides)`` builds a registered component and verifies its config,
registry info and checkpoint round trip. ``check_explainer(explainer, model, images)`` verifies
the explainer contract (shape, range, device, model left as found). Both raise
``AssertionError`` with a message naming the broken rule; use them in your plugin's tests.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import registry
from .core.component import KINDS
from .registry.checkpoints import load, save


def check_component(name: str, **overrides: Any) -> Any:
    """Build ``name`` and check config, info and save/load round trip; returns the component."""
    comp = registry.build(name, **overrides)
    entry = registry.entry(name)
    assert comp.registry_name == entry.name, f"registry_name {comp.registry_name!r} != {entry.name!r}"
    assert comp.kind in KINDS, f"kind {comp.kind!r} not in {KINDS}"
    assert isinstance(comp.config, type(comp).Config), "component.config is not its Config"
    again = type(comp).Config.model_validate_json(comp.config.model_dump_json())
    assert again == comp.config, "config does not survive a JSON round trip"
    info = registry.info(name)
    assert info["kind"] == comp.kind and "fields" in info
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.safetensors"
        save(comp, path)
        loaded = load(path)
        assert type(loaded) is type(comp), f"load() built {type(loaded).__name__}, expected {type(comp).__name__}"
        a, b = comp.state_dict(), loaded.state_dict()
        assert set(a) == set(b), f"state keys differ after load: {sorted(set(a) ^ set(b))[:10]}"
        for k in a:
            assert torch.equal(a[k].cpu(), b[k].cpu()), f"tensor {k!r} differs after load"
    return comp


def check_explainer(explainer: Any, model: nn.Module, images: torch.Tensor, targets: Any = None) -> torch.Tensor:
    """Run ``explainer.explain`` once and check the contract; returns the maps."""
    modes = {n: m.training for n, m in model.named_modules()}
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    hooks = _hook_count(model)
    before = images.clone()
    maps = explainer.explain(model, images, targets)
    b, _, h, w = images.shape
    assert maps.shape == (b, h, w), f"maps shape {tuple(maps.shape)}, expected {(b, h, w)}"
    assert maps.device == images.device, f"maps on {maps.device}, images on {images.device}"
    assert maps.is_floating_point() and not maps.requires_grad, "maps must be detached floats"
    assert bool(torch.isfinite(maps).all()), "maps contain NaN/Inf"
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0, "maps outside [0, 1]"
    assert torch.equal(images, before), "explain() modified the input images"
    assert _hook_count(model) == hooks, "explain() left hooks on the model"
    assert {n: m.training for n, m in model.named_modules()} == modes, "train/eval flags changed"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires, "requires_grad changed"
    for n, p in model.named_parameters():
        g0 = grads[n]
        assert (p.grad is None) == (g0 is None) and (g0 is None or torch.equal(p.grad, g0)), (
            f"parameter {n!r} .grad changed"
        )
    return maps


def _hook_count(model: nn.Module) -> int:
    total = 0
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_full_backward_hooks",
                     "_full_backward_pre_hooks"):
            total += len(getattr(m, attr, {}) or {})
    total += sum(len(getattr(p, "_backward_hooks", None) or {}) for p in model.parameters())
    return total
