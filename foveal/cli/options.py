"""What every ``foveal`` command parses the same way: option values, ``NAME:key=value,...`` component
specs, ``KEY=VALUE`` overrides, JSON objects, and ``--model`` (checkpoint, registered model or timm
name). One parser, so a value means the same thing in every command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..core.errors import InputError


def parse_value(text: str) -> Any:
    """A value as JSON when it parses (``3``, ``true``, ``[1, 2]``, ``"x"``), else the bare string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text.strip()


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, so ``fractions=[0,0.5],mode=negative`` is two options."""
    depth, start, parts = 0, 0, []
    for i, ch in enumerate(text):
        if ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def parse_assignments(items: list[str], what: str = "--set") -> dict[str, Any]:
    """``["k=v", "k2=[1,2]"]`` -> ``{"k": v, "k2": [1, 2]}`` (values by :func:`parse_value`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise InputError(f"{what} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_value(value)
    return out


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:k=v,k2=[1,2]"`` -> ``("name", {"k": v, "k2": [1, 2]})`` (JSON values when they parse)."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise InputError(f"component spec {spec!r}: expected NAME or NAME:key=value,...")
    try:
        return name, parse_assignments(_split_top_level(rest), what=f"component spec {spec!r}: option")
    except InputError as e:
        raise InputError(f"component spec {spec!r}: every option must be key=value ({e})") from None


def json_object(text: str) -> dict[str, Any]:
    """argparse ``type=`` for options that take a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def build_component(spec: str, kind: str) -> Any:
    """Build the registered ``kind`` component of a ``NAME[:k=v,...]`` spec."""
    from .. import registry

    name, opts = parse_spec(spec)
    entry = registry.entry(name)
    if entry.kind != kind:
        raise InputError(f"{spec!r} is a {entry.kind}, expected a registered {kind} "
                         f"(see `foveal list --kind {kind}`)")
    return registry.build(name, **opts)


def load_model(spec: str, weights: str | None = None, num_classes: int | None = None):
    """``--model``: a foveal checkpoint file, a registered model ``NAME[:k=v,...]``, or a timm model
    (``timm:NAME[:k=v,...]`` or a plain timm name), built with random weights; ``weights`` is a
    local ``.safetensors``/``.pth`` file loaded into a timm model (nothing is downloaded)."""
    import torch

    from .. import registry
    from ..core.checkpoint import load_weights, read_state_dict
    from ..registry.checkpoints import load

    path = Path(spec)
    if path.is_file():
        if weights:
            raise InputError("--weights applies to timm models; a foveal checkpoint carries its own weights")
        model = load(path)
        if not isinstance(model, torch.nn.Module):
            raise InputError(f"{path} holds a {getattr(model, 'kind', type(model).__name__)}, not a model")
        return model
    timm_spec = spec[len("timm:"):] if spec.startswith("timm:") else None
    if timm_spec is None:
        name, opts = parse_spec(spec)
        if registry.has(name) and registry.entry(name).kind == "model":
            if weights:
                raise InputError("--weights applies to timm models; registered models take their weights "
                                 "options (e.g. backbone_weights=FILE), and foveal.save writes checkpoints")
            return registry.build(name, **opts)
        timm_spec = spec
    import timm

    name, opts = parse_spec(timm_spec)
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        hint = f"; timm models containing it: {', '.join(close)}" if close else ""
        raise InputError(f"--model {spec!r} is not a file, a registry model or a timm model name{hint}")
    if num_classes is not None:
        opts["num_classes"] = num_classes
    model = timm.create_model(name, pretrained=False, **opts)
    if weights:
        load_weights(model, read_state_dict(weights), source=str(weights))
    return model
