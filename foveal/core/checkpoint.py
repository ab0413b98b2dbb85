"""Checkpoints: safetensors files with the metadata needed to rebuild a component.

* :func:`atomic_save_file` / :func:`read_checkpoint`: the safetensors files behind ``foveal.save`` /
  ``foveal.load`` (:mod:`foveal.registry.checkpoints`, which knows the registry).
* :func:`save_state` / :func:`load_state`: any nested training state (model, optimizer,
  scheduler, RNG states, counters) as tensors plus a JSON skeleton; nothing is pickled.
* :func:`read_state_dict`: third-party weight files (``.safetensors``; ``.pth``/``.pt``/``.bin``
  through ``torch.load(weights_only=True)``).

Every write goes to a temporary file in the target folder and is renamed into place, so an
interrupted write never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

FORMAT = "foveal.checkpoint/1"
STATE_FORMAT = "foveal.state/1"


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """``safetensors.torch.save_file`` through a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"expected a checkpoint file, got a directory: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (corrupt or truncated?): {e}"
        ) from e
    return tensors, metadata


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a foveal checkpoint (raises :class:`CheckpointError` if it is not one)."""
    _, meta = read_checkpoint(path)
    check_format(path, meta, FORMAT)
    return meta


def check_format(path: Any, meta: Mapping[str, str], expected: str) -> None:
    fmt = meta.get("format")
    if fmt != expected:
        what = f"format {fmt!r}" if fmt else "no foveal metadata"
        raise CheckpointError(
            f"{path} is a safetensors file but not a foveal checkpoint (expected format "
            f"{expected!r}, found {what}); for plain weight files use read_state_dict()"
        )


def load_weights(
    component: Any, state: Mapping[str, torch.Tensor], *, source: str = "state", strict: bool = True
) -> None:
    """Load ``state`` into ``component``, listing missing/unexpected keys and shape mismatches."""
    own = component.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(own[k].shape) != tuple(state[k].shape)
    ]
    if shapes or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_short(shapes)}")
        raise CheckpointError(f"{source} does not fit {type(component).__name__}: " + "; ".join(parts))
    if isinstance(component, torch.nn.Module):
        component.load_state_dict(dict(state), strict=strict)
    else:
        component.load_state_dict(dict(state), strict=strict)


def _short(items: list[str], n: int = 12) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a plain weight file: safetensors, or a ``.pth``/``.pt``/``.bin`` with
    ``torch.load(weights_only=True)`` (never unpickling arbitrary objects). A top-level
    ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper is unwrapped."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        tensors, _ = read_checkpoint(path)
        return tensors
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt/unsafe pickles
        raise CheckpointError(
            f"{path} could not be read with torch.load(weights_only=True) (corrupt, truncated, or "
            f"it contains pickled objects other than tensors): {e}"
        ) from e
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (got {type(obj).__name__})")
    return dict(obj)


# --- nested training state ---------------------------------------------------------------

def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj
        return {"__tensor__": key}
    if hasattr(obj, "dtype") and hasattr(obj, "shape") and type(obj).__module__ == "numpy":
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(obj.copy())
        return {"__ndarray__": key}
    if isinstance(obj, Mapping):
        return {"__dict__": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"save_state: cannot store a {type(obj).__name__} (only tensors, arrays, "
                    "dicts, lists, tuples, numbers, strings and None)")


def _unflatten(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
    return obj


def save_state(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Atomically write a nested state (e.g. ``{"model": sd, "optimizer": opt.state_dict(),
    "epoch": 3, "rng": ...}``) to safetensors; tensors that share storage are copied apart."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(dict(state), tensors)
    tensors = {k: v.detach().clone() for k, v in tensors.items()}
    return atomic_save_file(tensors, path, {"format": STATE_FORMAT, "skeleton": json.dumps(skeleton)})


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state written by :func:`save_state`."""
    tensors, meta = read_checkpoint(path)
    check_format(path, meta, STATE_FORMAT)
    try:
        skeleton = json.loads(meta["skeleton"])
        return _unflatten(skeleton, tensors)
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: damaged state skeleton: {e}") from e
