"""What every trainer shares: the training-loop skeleton :class:`TrainingRun` and its pieces
(seeding, exact resume, metrics log, torchrun/DDP set-up).

A trainer (segmentation, CA-Stream, AffinityNet) runs its epochs through :class:`TrainingRun`,
which writes ``<out>/last.safetensors`` atomically at the end of every epoch with
:func:`save_training_state` (model, optimizer, scheduler, epoch, step, RNG states, the model's
identity) and, given ``resume=True``, continues from it with :func:`load_training_state`; an
output folder that holds a run is never overwritten without ``overwrite=True``. Shuffling uses a
generator seeded with the epoch so an interrupted and resumed run sees the same batches as an
uninterrupted one (bit for bit on the CPU).
"""

from __future__ import annotations

import json
import os
import random
import time
import warnings as _warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import atomic_write_bytes, load_state, load_weights, remove_stale_temp_files, save_state
from .errors import CheckpointError, InputError
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
    stateful: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write everything needed to resume after ``epoch`` epochs have completed.

    ``extra``: plain values recorded as they are (a trainer's model name and config, compared by
    :func:`check_same_run` on resume); ``stateful``: further objects with ``state_dict()`` /
    ``load_state_dict()`` (a ``GradScaler``, an EMA, a data source's position), saved by name."""
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "step": int(step),
        "rng": rng_state(),
        "extra": dict(extra or {}),
        "stateful": {name: obj.state_dict() for name, obj in (stateful or {}).items()},
    }
    return save_state(state, path)


def load_training_state(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
    stateful: Mapping[str, Any] | None = None,
    expect: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Load a state written by :func:`save_training_state` into the given objects; returns it
    (``state["epoch"]`` is the number of completed epochs). ``expect``: the ``extra`` values this
    run would record (model name, config); a state written for another model or config raises a
    one-line :class:`CheckpointError` naming both (:func:`check_same_run`) before any loading,
    and a state whose tensors do not fit the model one listing the keys (never torch's dump)."""
    state = load_state(path)
    if expect:
        check_same_run(state.get("extra") or {}, expect, source=path, model=unwrap(model))
    load_weights(unwrap(model), state["model"], source=f"the training state {path}")
    try:
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        for name, obj in (stateful or {}).items():
            if name in (state.get("stateful") or {}):
                obj.load_state_dict(state["stateful"][name])
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"the training state {path} does not fit this run's optimizer, scheduler or "
                              f"state items: {' '.join(str(e).split())[:300]}") from e
    if restore_rng:
        set_rng_state(state["rng"])
    return state


def check_same_run(recorded: Mapping[str, Any], expect: Mapping[str, Any], *, source: Any,
                   model: Any = None) -> None:
    """Raise a one-line :class:`CheckpointError` when a training state was written for another
    model or config than this run's. Compares the keys of ``expect`` present in ``recorded``;
    dict values (configs) field by field, skipping the model's ``checkpoint_exclude`` fields
    (initial weight files: the state's own tensors replace them) and fields the state lacks
    (added since it was written); a field only the state has means a newer foveal wrote it."""
    skip = set(getattr(model, "checkpoint_exclude", ()))
    name = recorded.get("model", expect.get("model", "the model"))
    for key, value in expect.items():
        if key not in recorded:
            continue
        old = recorded[key]
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            unknown = sorted(set(old) - set(value) - skip)
            if unknown:
                raise CheckpointError(
                    f"cannot resume from {source}: its {key} of {name!r} has field(s) "
                    f"{', '.join(map(repr, unknown))} that this foveal does not know (written by a newer foveal?)"
                )
            diffs = [f"{k}={old[k]!r} (checkpoint) vs {value[k]!r} (this run)"
                     for k in value if k in old and k not in skip and old[k] != value[k]]
            if diffs:
                raise CheckpointError(
                    f"cannot resume from {source}: {name!r} was trained with other {key} values: "
                    f"{'; '.join(diffs[:6])}{' ...' if len(diffs) > 6 else ''}; resume with the same settings, or "
                    f"start afresh with --overwrite (overwrite=True) or another output folder"
                )
        elif old != value:
            raise CheckpointError(
                f"cannot resume from {source}: it holds {key} {old!r}, this run builds {value!r}; resume with "
                f"{key} {old!r}, or start afresh with --overwrite (overwrite=True) or another output folder"
            )


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
            atomic_write_bytes("".join(json.dumps(r) + "\n" for r in keep).encode(), self.path)


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


def sync_buffers(model: nn.Module) -> None:
    """Broadcast rank 0's buffers (BatchNorm running statistics) to every process."""
    for buf in unwrap(model).buffers():
        dist.broadcast(buf, src=0)


# --- the training-loop skeleton ----------------------------------------------------------------


class TrainingRun:
    """The training loop every foveal trainer shares (issue 12): output-folder rules, DDP set-up,
    exact resume, epochs with a progress bar, a JSONL log and atomic per-epoch checkpoints. The
    trainer supplies what differs: the model, the optimiser, the epoch's batches and one training
    step. In four calls::

        run = TrainingRun(out, epochs=cfg.epochs, resume=cfg.resume, overwrite=cfg.overwrite,
                          device=cfg.device, outputs=("model.safetensors",))       # 1. DDP, device
        seed_everything(cfg.seed)
        model = build(...).to(run.device); optimizer, scheduler = ...
        run.start(model, optimizer, scheduler, identity={"model": name, "model_config": config})  # 2.
        net = run.wrap(model)                      # 3. DistributedDataParallel under torchrun
        history = run.fit(batches, step, summarize=..., evaluate=..., export=...)    # 4. the epochs

    1. ``TrainingRun(...)`` initialises the process group under ``torchrun``
       (:func:`init_distributed`; ``run.rank``, ``run.world``, ``run.main``) and picks the device
       (:func:`training_device`); it writes nothing.
    2. ``start`` checks the output folder once the trainer has validated its settings and built
       its model. ``out`` *holds a run* when it has ``last.safetensors``, a non-empty log or one of
       ``outputs``: ``resume`` continues it (a folder without a run starts one); ``overwrite``
       deletes those files and starts afresh; neither refuses with an :class:`InputError` naming
       the folder and both ways out. Stale temporary files of interrupted writes of the run's
       files are removed (:func:`~foveal.core.checkpoint.remove_stale_temp_files`, never anything
       else). Only rank 0 writes; the others wait for it. ``start`` then remembers what each
       checkpoint saves (model, optimiser, scheduler, ``identity``: plain values such as the model
       name and config; ``stateful``: further objects with ``state_dict``/``load_state_dict``, e.g.
       a GradScaler or a data source's position) and, when resuming, loads ``last.safetensors``
       into them (weights, optimiser, scheduler, items, RNG streams; a state written for another
       ``identity`` is refused in one line by :func:`check_same_run`), sets ``run.start_epoch`` /
       ``run.step`` and drops log records of later epochs.
    3. ``wrap`` returns the model wrapped in ``DistributedDataParallel`` when ``run.world > 1``.
    4. ``fit`` runs epochs ``start_epoch .. epochs - 1``. Each epoch it calls ``batches(epoch)``
       (which sets the model's training mode and returns the epoch's batches, seeded by the epoch
       so a resumed run sees the same ones; a ``DataLoader``'s ``sampler.set_epoch(epoch)`` is
       called here, the DDP sampler hook), then ``step(batch)`` for every batch (forward,
       backward, optimiser step; it returns numbers or tensors that are summed over the epoch,
       e.g. ``{"loss": loss * n, "count": n}``; ``run.step`` counts the calls over the whole run).
       The scheduler steps per epoch (or per step with ``scheduler_interval="step"``). At the end
       of the epoch the sums are added over the processes and ``summarize(sums)`` makes the log
       record (default: each sum divided by the number of steps of all processes); DDP replicas
       get rank 0's buffers; rank 0 adds ``evaluate()``'s values, the learning rate and the time,
       appends the record to the log, writes ``last.safetensors`` (in that order: a run killed in
       between redoes the epoch and rewrites its record) and calls ``export()`` (e.g.
       ``foveal.save`` of the model into one of ``outputs``). ``warnings`` are issued once as
       ``UserWarning`` when a run starts and stored in its first record. Returns the log records
       of every completed epoch.
    """

    def __init__(self, out: str | os.PathLike, *, epochs: int, resume: bool = False, overwrite: bool = False,
                 device: str | torch.device | None = None, log_name: str = "metrics.jsonl",
                 outputs: tuple[str, ...] = (), progress: bool = True, desc: str = "epoch") -> None:
        if resume and overwrite:
            raise InputError("resume and overwrite exclude each other: resume continues the run in the output "
                             "folder, overwrite deletes it")
        self.rank, self.world = init_distributed(device=device)
        self.device = training_device(device)
        self.main = is_main_process()
        self.out = Path(out)
        self.epochs = int(epochs)
        self.last = self.out / "last.safetensors"
        self.log = MetricsLog(self.out / log_name, enabled=self.main)
        self.outputs = tuple(self.out / name for name in outputs)
        self.progress, self.desc = progress, desc
        self.start_epoch = self.step = 0
        self.epoch = 0
        self._saved: dict[str, Any] = {}
        self._resume, self._overwrite = resume, overwrite
        self.resuming = False

    def run_files(self) -> list[Path]:
        """The files of a run present in ``out``: checkpoint, non-empty log, ``outputs``."""
        log = self.log.path
        candidates = [self.last, *([log] if log.exists() and log.stat().st_size else []), *self.outputs]
        return [p for p in candidates if p.is_file()]

    def start(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None, *,
              identity: Mapping[str, Any] | None = None, stateful: Mapping[str, Any] | None = None) -> int:
        """Check the output folder, remember what checkpoints save, and resume when asked (see the
        class docstring). Returns the number of completed epochs."""
        self._prepare_folder()
        self._saved = {"model": model, "optimizer": optimizer, "scheduler": scheduler,
                       "extra": dict(identity or {}), "stateful": dict(stateful or {})}
        if self.resuming:
            state = load_training_state(self.last, model=model, optimizer=optimizer, scheduler=scheduler,
                                        stateful=stateful, expect=identity)
            self.start_epoch, self.step = int(state["epoch"]), int(state["step"])
            self.log.truncate_after(self.start_epoch)
            if self.main and self.progress:
                print(f"resumed from {self.last} after epoch {self.start_epoch}")
        return self.start_epoch

    def _prepare_folder(self) -> None:
        found = self.run_files()
        self.resuming = self._resume and self.last.exists()
        if found and not self._overwrite and not self.resuming:
            names = ", ".join(p.name for p in found)
            why = "has no last.safetensors to resume from" if self._resume else "already holds a training run"
            raise InputError(f"{self.out} {why} ({names}): pass --resume (resume=True) to continue it, or "
                             "--overwrite (overwrite=True) to delete its checkpoints and log and start afresh")
        if self.main:
            if self._overwrite:
                for path in found:
                    path.unlink()
            for path in (self.last, self.log.path, *self.outputs):
                remove_stale_temp_files(path)
            self.out.mkdir(parents=True, exist_ok=True)
        if self.world > 1:
            dist.barrier()

    def wrap(self, model: nn.Module, **ddp_options: Any) -> nn.Module:
        """``model`` in ``DistributedDataParallel`` (on this process's GPU) when ``world > 1``."""
        if self.world == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **ddp_options)

    def fit(
        self,
        batches: Callable[[int], Iterable[Any]],
        step: Callable[[Any], Mapping[str, Any]],
        *,
        summarize: Callable[[dict[str, float]], Mapping[str, Any]] | None = None,
        evaluate: Callable[[], Mapping[str, Any]] | None = None,
        export: Callable[[], Any] | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        warnings: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        """Run the remaining epochs (see the class docstring); returns the log records."""
        if not self._saved:
            raise RuntimeError("TrainingRun.fit: call start(model, optimizer, ...) first")
        model, optimizer, scheduler = self._saved["model"], self._saved["optimizer"], self._saved["scheduler"]
        fresh = self.start_epoch == 0
        if fresh and self.main:
            for message in warnings:
                _warnings.warn(message, UserWarning, stacklevel=3)
        history = self.log.read() if self.main else []
        for epoch in range(self.start_epoch, self.epochs):
            t0 = time.time()
            self.epoch = epoch
            data = batches(epoch)
            sampler = getattr(data, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            sums: dict[str, Any] = {}
            steps = 0
            show = self.progress and self.main
            bar = tqdm(data, desc=f"{self.desc} {epoch + 1}/{self.epochs}", disable=not show, leave=False)
            for batch in bar:
                values = step(batch)
                steps += 1
                self.step += 1
                if scheduler is not None and scheduler_interval == "step":
                    scheduler.step()
                for key, value in values.items():
                    value = value.detach().double() if isinstance(value, torch.Tensor) else float(value)
                    sums[key] = sums[key] + value if key in sums else value
                if show:  # the running epoch summary of this process
                    running = {k: float(v) for k, v in sums.items()}
                    shown = summarize(running) if summarize else {k: v / steps for k, v in running.items()}
                    bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items() if isinstance(v, float)}, refresh=False)
            if scheduler is not None and scheduler_interval == "epoch":
                scheduler.step()
            totals, total_steps = self._sum_over_processes(sums, steps)
            if self.world > 1:
                sync_buffers(model)
            if summarize is not None:
                record = {"epoch": epoch + 1, **summarize(totals)}
            else:
                record = {"epoch": epoch + 1, **{k: v / max(total_steps, 1) for k, v in totals.items()}}
            if optimizer is not None:
                record["lr"] = optimizer.param_groups[0]["lr"]
            if self.main:
                if evaluate is not None:
                    record.update(evaluate())
                if fresh and epoch == 0 and warnings:
                    record["warnings"] = list(warnings)
                record["seconds"] = round(time.time() - t0, 3)
                self.log.write(**record)
                history.append(record)
                self.save(epoch + 1)
                if export is not None:
                    export()
                if self.progress:
                    values = ", ".join(f"{k} {v:.4f}" for k, v in record.items()
                                       if isinstance(v, float) and k not in ("lr", "seconds"))
                    print(f"{self.desc} {epoch + 1}/{self.epochs}: {values} ({record['seconds']:.1f} s)")
            if self.world > 1:
                dist.barrier()
        if self.main and export is not None and self.start_epoch >= self.epochs:
            export()  # nothing left to train: the export matches last.safetensors again
        return history

    def save(self, epoch: int) -> Path:
        """Write ``last.safetensors`` after ``epoch`` completed epochs (rank 0 calls it in ``fit``)."""
        s = self._saved
        return save_training_state(self.last, model=s["model"], optimizer=s["optimizer"], scheduler=s["scheduler"],
                                   epoch=epoch, step=self.step, extra=s["extra"], stateful=s["stateful"])

    def _sum_over_processes(self, sums: dict[str, Any], steps: int) -> tuple[dict[str, float], int]:
        keys = list(sums)
        values = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64).to(self.device) for k in keys]
                             + [torch.tensor(float(steps), dtype=torch.float64, device=self.device)])
        if self.world > 1:
            dist.all_reduce(values)
        values = values.cpu().tolist()
        return dict(zip(keys, values[:-1])), int(values[-1])
