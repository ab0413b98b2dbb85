"""Pieces every trainer shares: seeding, exact resume, metrics log, torchrun/DDP set-up.

A trainer (segmentation, CA-Stream, AffinityNet) writes ``<out>/last.safetensors`` at the end of
every epoch with :func:`save_training_state` (model, optimizer, scheduler, epoch, RNG states)
and, given ``resume=True``, continues from it with :func:`load_training_state`. Shuffling uses
a generator seeded with ``seed + epoch`` so an interrupted and resumed run sees the same batches
as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import load_state, save_state
from .tensors import resolve_device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states; with CUDA initialised also every GPU's generator
    (dropout and drop-path draw from it when the model trains on a GPU)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore :func:`rng_state`; the GPU generators when the state has them and this machine
    has as many GPUs (a run resumed on another machine keeps its fresh GPU generators)."""
    random.setstate(_tuplify(state["python"]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.cpu() for t in cuda])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_training_state(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    epoch: int,
    step: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write everything needed to resume after ``epoch`` epochs have completed."""
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "step": int(step),
        "rng": rng_state(),
        "extra": dict(extra or {}),
    }
    return save_state(state, path)


def load_training_state(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a state written by :func:`save_training_state` into the given objects; returns it
    (``state["epoch"]`` is the number of completed epochs)."""
    state = load_state(path)
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return state


class MetricsLog:
    """Append-only JSON-lines log (one object per epoch/eval), safe to reopen on resume."""

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, epoch: int) -> None:
        """Drop records of epochs > ``epoch`` (written after the checkpoint a resume starts from)."""
        if self.enabled and self.path.exists():
            keep = [r for r in self.read() if r.get("epoch", 0) <= epoch]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def distributed_env() -> bool:
    """True when launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(backend: str | None = None, device: str | torch.device | None = None) -> tuple[int, int]:
    """Initialise the process group from torchrun's environment; returns (rank, world_size).

    Without torchrun returns (0, 1) and does nothing. The backend defaults to ``nccl`` when the
    training runs on CUDA (``device`` a CUDA device, or None with CUDA available) and ``gloo``
    otherwise (a CPU run on a GPU machine needs gloo: NCCL has no CPU tensors).
    """
    if not distributed_env():
        return 0, 1
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        backend = backend or ("nccl" if cuda else "gloo")
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def training_device(requested: str | torch.device | None) -> torch.device:
    """The device a training process uses: ``requested`` (checked by
    :func:`~foveal.core.tensors.resolve_device`), else ``cuda:LOCAL_RANK`` (wrapped over the GPUs
    when processes outnumber them, and made the current CUDA device for NCCL) when CUDA is
    available, else the CPU."""
    if requested:
        return resolve_device(requested, "device")
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
