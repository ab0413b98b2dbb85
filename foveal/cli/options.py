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
    local ``.safetensors``/``.pth`` file loaded into a timm model (nothing is downloaded). Without
    ``num_classes`` (or a ``num_classes=`` option) a timm model takes its class count from the
    classifier in ``weights`` (a 10-class fine-tune of ``resnet50`` loads as 10 classes)."""
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
    state = read_state_dict(weights) if weights else None
    model = timm.create_model(name, pretrained=False, **opts)
    if state is not None and "num_classes" not in opts:
        found = _classifier_classes(model, state)
        if found is not None and found != getattr(model, "num_classes", found):
            model = timm.create_model(name, pretrained=False, num_classes=found, **opts)
    if state is not None:
        load_weights(model, state, source=str(weights))
    return model


def _classifier_classes(model, state) -> int | None:
    """Rows of the classifier weight in ``state`` (timm's ``pretrained_cfg["classifier"]`` names it)."""
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    heads = head if isinstance(head, (list, tuple)) else [head] if head else []
    for h in heads:
        w = state.get(f"{h}.weight")
        if w is not None and w.dim() >= 2:
            return int(w.shape[0])
    return None


def input_normalization(model) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """``(mean, std, source)`` the model expects its inputs normalised with: a timm model's
    ``pretrained_cfg`` mean/std (``vit_base_patch16_224``: 0.5, 0.5, 0.5), else ImageNet's (what
    foveal's own trainers normalise with)."""
    from ..data.images import IMAGENET_MEAN, IMAGENET_STD

    cfg = getattr(model, "pretrained_cfg", None)
    if getattr(model, "kind", None) != "model" and isinstance(cfg, dict) and cfg.get("mean") and cfg.get("std"):
        return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"]), "the timm pretrained_cfg"
    return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD), "ImageNet's"
