"""``foveal.save`` / ``foveal.load``: a registered component as one safetensors file (weights +
registry name + config JSON + the plugin distribution that provides it). The file format and the
atomic write live in :mod:`foveal.core.checkpoint`; this module adds what needs the registry."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..core.checkpoint import (
    FORMAT,
    atomic_save_file,
    check_config_fields,
    check_format,
    load_weights,
    read_checkpoint,
)
from ..core.errors import CheckpointError


def _registry():
    from . import REGISTRY

    return REGISTRY


def _plugin_of(component: Any) -> tuple[str, str]:
    name = getattr(component, "registry_name", None)
    if name is None:
        return "", ""
    try:
        entry = _registry().entry(name)
    except Exception:
        return "", ""
    return entry.distribution, entry.distribution_version


def save(component: Any, path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``component`` (built by ``registry.build``) to one safetensors file, atomically.

    Metadata: ``format``, ``name`` (registry name), ``kind``, ``config`` (JSON), ``foveal_version``,
    ``plugin`` and ``plugin_version`` (the distribution that registered it), plus ``metadata``.
    """
    from .. import __version__

    name = getattr(component, "registry_name", None)
    if not name:
        raise CheckpointError(
            f"cannot save {type(component).__name__}: it has no registry name; build it with "
            "foveal.registry.build(name, ...) (or set .registry_name to its registered name)"
        )
    dist, dist_version = _plugin_of(component)
    meta = {
        "format": FORMAT,
        "name": name,
        "kind": getattr(component, "kind", ""),
        "config": json.dumps(checkpoint_config(component)),
        "foveal_version": __version__,
        "plugin": dist,
        "plugin_version": dist_version,
    }
    for k, v in (metadata or {}).items():
        meta[str(k)] = str(v)
    return atomic_save_file(dict(component.state_dict()), path, meta)


def checkpoint_config(component: Any) -> dict[str, Any]:
    """The config as saved: JSON-ready, with ``checkpoint_exclude`` fields reset to defaults."""
    config = component.config.model_dump(mode="json")
    fields = type(component.config).model_fields
    for name in getattr(component, "checkpoint_exclude", ()):
        if name in fields and not fields[name].is_required():
            config[name] = fields[name].get_default(call_default_factory=True)
    return config


def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu", strict: bool = True) -> Any:
    """Rebuild the component saved by :func:`save` through ``registry.build`` and load its weights.

    Each failure is one line (:class:`CheckpointError`): a file that is not a foveal checkpoint (a
    PyTorch ``.pth``/``.pt``: use ``read_state_dict`` or the model's weights option), a component
    no installed plugin provides, a config field the installed component does not know (a newer
    foveal or plugin wrote it), weights that do not fit (keys listed)."""
    tensors, meta = read_checkpoint(path)
    check_format(path, meta, FORMAT)
    name = meta.get("name", "")
    try:
        config = json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the config metadata is not valid JSON: {e}") from e
    if not _registry().has(name):
        plugin = meta.get("plugin") or "the plugin that provides it"
        version = meta.get("plugin_version")
        pin = f"=={version}" if version and meta.get("plugin") else ""
        raise CheckpointError(
            f"{path} holds component {name!r}, which no installed plugin provides; "
            f"install it with: pip install {plugin}{pin}"
        )
    from .. import __version__

    entry = _registry().entry(name)
    writer = meta.get("plugin") or "foveal"
    written = meta.get("foveal_version" if writer == "foveal" else "plugin_version") or "?"
    installed = __version__ if writer == "foveal" else entry.distribution_version
    check_config_fields(entry.cls.Config, config, component=name, source=path,
                        versions=f"checkpoint from {writer} {written}, installed {installed}")
    component = _registry().build(name, **config)
    load_weights(component, tensors, source=str(path), strict=strict)
    if isinstance(component, torch.nn.Module):
        component.to(map_location)
    return component
