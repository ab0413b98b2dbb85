"""Checkpoints: safetensors files with the metadata needed to rebuild a component.

* :func:`atomic_save_file` / :func:`read_checkpoint`: the safetensors files behind ``foveal.save`` /
  ``foveal.load`` (:mod:`foveal.registry.checkpoints`, which knows the registry).
* :func:`save_state` / :func:`load_state`: any nested training state (model, optimizer,
  scheduler, RNG states, counters) as tensors plus a JSON skeleton; nothing is pickled.
* :func:`read_state_dict`: third-party weight files (``.safetensors``; ``.pth``/``.pt``/``.bin``
  through ``torch.load(weights_only=True)``).

Atomic writes (:func:`atomic_save_file`, :func:`atomic_write_bytes`): everything is written inside
a temporary folder ``.<name>.<host>.<pid>.<token>.tmp`` next to the target (safetensors >= 0.6
writes through a temporary file of its own, which therefore lands in that folder too), then the
file is renamed into place, so an interrupted write never leaves a half-written file under the
final name. The file gets the permissions a plain ``open()`` gives under the umask (the mode of a
file created with mode 0o666 in the temporary folder), not the 0600 of ``mkstemp``.

A write killed mid-way (SIGKILL, power loss) leaves its temporary folder behind. Every later
write of the same target, and every resume (:func:`remove_stale_temp_files`), removes the
temporary folders of that target whose writer is gone: written on this host by a process id that
no longer exists (or by this very process, outside any write in progress); written on another
host (a shared file system), or under the name earlier foveal versions gave them
(``.<name>.XXXXXXXX.tmp``, from ``mkstemp``, without a process id), once untouched for
:data:`STALE_AFTER_SECONDS`. Nothing else is ever removed (in particular not the ``.tmpXXXXXX``
files that safetensors itself left next to checkpoints written by earlier foveal versions: their
names do not say who wrote them).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

FORMAT = "foveal.checkpoint/1"
STATE_FORMAT = "foveal.state/1"
#: A temporary write folder of another host (or with no process id) older than this is stale.
STALE_AFTER_SECONDS = 3600.0

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_WRITING: set[str] = set()  # temporary folders of this process's writes in progress
_TEMP_NAME = re.compile(r"(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]{8})\.tmp")
_LEGACY_TEMP_NAME = re.compile(r"[a-z0-9_]{8}\.tmp")  # tempfile.mkstemp(prefix=".<name>.", suffix=".tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, owned by someone else; other errors: assume alive
        return True
    return True


def _is_stale(entry: Path, rest: str, now: float) -> bool:
    match = _TEMP_NAME.fullmatch(rest)
    if match and match["host"] == _HOST:
        pid = int(match["pid"])
        if pid == os.getpid():
            return entry.name not in _WRITING
        return not _pid_alive(pid)
    if match or _LEGACY_TEMP_NAME.fullmatch(rest):
        try:
            return now - entry.lstat().st_mtime > STALE_AFTER_SECONDS
        except FileNotFoundError:
            return False
    return False


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files/folders that interrupted atomic writes of ``path`` left behind
    (see the module docstring for when one counts as stale); returns what was removed."""
    path = Path(path)
    prefix = f".{path.name}."
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    now = time.time()
    for entry in path.parent.iterdir():
        if not entry.name.startswith(prefix) or not _is_stale(entry, entry.name[len(prefix):], now):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:  # removed concurrently
            continue
        removed.append(entry)
    return removed


@contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a fresh file path (created empty, mode as ``open()`` gives it) inside this write's
    own temporary folder; on success it is fsynced and renamed to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path)
    folder = path.parent / f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    _WRITING.add(folder.name)
    try:
        folder.mkdir()
        target = folder / path.name
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = target.stat().st_mode & 0o7777
        yield target
        os.chmod(target, mode)  # safetensors creates its file with 0600
        with open(target, "rb") as f:
            os.fsync(f.fileno())
        os.replace(target, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        _WRITING.discard(folder.name)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """``safetensors.torch.save_file`` through a temporary file renamed into place."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with _atomic_target(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` through a temporary file renamed into place."""
    path = Path(path)
    with _atomic_target(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return path


PLAIN_WEIGHTS_HINT = (
    "read plain weights with foveal.core.checkpoint.read_state_dict(path), or pass the file as the "
    "weights of the model you build: backbone_weights= / --backbone-weights for registered models, "
    "weights= / --weights for timm models"
)


def file_format(path: str | os.PathLike) -> str:
    """``"safetensors"``, ``"torch"`` (a ``torch.save`` zip archive or legacy pickle) or
    ``"unknown"``, from the first bytes of the file (not its suffix)."""
    with open(path, "rb") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    if head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    return "unknown"


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a PyTorch ``.pth``/``.pt`` file or anything
    else that is not safetensors raises :class:`CheckpointError` saying what to use instead."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"expected a checkpoint file, got a directory: {path}")
    if file_format(path) == "torch":
        raise CheckpointError(
            f"{path} is a PyTorch file (torch.save zip/pickle), not a foveal checkpoint (a safetensors "
            f"file written by foveal.save); {PLAIN_WEIGHTS_HINT}"
        )
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path} is not a foveal checkpoint: not a readable safetensors file (corrupt or truncated?): "
            f"{_one_line(e)}; foveal.load reads files written by foveal.save, read_state_dict() plain weight files"
        ) from e
    return tensors, metadata


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:300] + " ..."


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


def check_config_fields(config_cls: Any, config: Mapping[str, Any], *, component: str, source: Any,
                        versions: str = "") -> None:
    """Raise a one-line :class:`CheckpointError` when a saved ``config`` has fields that
    ``config_cls`` (the installed component's pydantic Config) does not declare, instead of
    pydantic's validation error; ``versions`` (e.g. "checkpoint: foveal 0.3, installed: 0.1") is
    added to the message."""
    known = getattr(config_cls, "model_fields", {})
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise CheckpointError(
            f"{source}: the saved config of {component!r} has field(s) {', '.join(map(repr, unknown))} that the "
            f"installed {component!r} does not know: written by a newer foveal or plugin"
            f"{f' ({versions})' if versions else ''}? Upgrade it, or read the weights alone with read_state_dict()"
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
    component.load_state_dict(dict(state), strict=strict)


def _short(items: list[str], n: int = 12) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a plain weight file: safetensors, or a ``.pth``/``.pt``/``.bin`` (recognised by its
    content) with ``torch.load(weights_only=True)`` (never unpickling arbitrary objects). A top-level
    ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper is unwrapped."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if file_format(path) != "torch":  # safetensors (any suffix), or an error naming the file
        tensors, _ = read_checkpoint(path)
        return tensors
    try:
        with open(path, "rb") as f:  # a file object: torch.load goes by content, not by suffix
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt/unsafe pickles
        raise CheckpointError(
            f"{path} could not be read with torch.load(weights_only=True) (corrupt, truncated, or "
            f"it contains pickled objects other than tensors): {_one_line(e)}"
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
