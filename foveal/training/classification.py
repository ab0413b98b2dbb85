"""Training image classifiers: CA-Stream on a frozen classifier, or a plain GAP classifier.

CA-Stream training (ca-stream.txt, section 3.3, "Training"): the network f (backbone including
its batch-norm statistics, kept in eval mode) and the classifier g stay frozen; only q_0 and the
stream (W_l, optional projections) learn, with cross-entropy on the frozen classifier's logits.
Defaults follow the issue: SGD, lr 0.1, momentum 0.9, weight decay 1e-4, step schedule (x0.1
every 30 epochs); the paper gives no schedule. ``train_mode="full"`` trains every parameter
instead (the GAP baseline trained from scratch in tests and the demo).

The epochs run in the shared skeleton :class:`~foveal.core.training.TrainingRun`. Every epoch
writes ``<out>/last.safetensors`` (model, optimizer, scheduler, RNG states) and
``<out>/model.safetensors`` (the model as a foveal component, ``foveal.load``-able), both
atomically; ``resume=True`` continues exactly where the last completed epoch ended (bit for bit
on the CPU; on CUDA up to cuDNN's run-to-run noise, the GPU generators restored too), and an
``out`` that already holds a run is refused unless ``resume=True`` or ``overwrite=True`` (start
afresh). One JSON line per epoch goes to ``<out>/log.jsonl``. Under ``torchrun`` the model is
wrapped in ``DistributedDataParallel`` with a ``DistributedSampler``; rank 0 evaluates and writes
files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from .. import registry
from ..core.errors import InputError
from ..core.training import TrainingRun, seed_everything, unwrap
from ..data.classification import ImageFolderDataset, split_folder
from ..registry.checkpoints import checkpoint_config, load, save


class ClassifierTrainConfig(BaseModel):
    """Settings of :func:`train_classifier` (every field has a default except ``data``/``out``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    data: str = Field(description="Image-folder dataset: root/<class>/* or root/{train,val}/<class>/*.")
    out: str = Field(description="Output folder (checkpoints, log.jsonl).")
    pooling: Literal["gap", "ca-stream"] = Field("ca-stream", description="Pooling of the trained classifier.")
    train_mode: Literal["stream", "full"] | None = Field(
        None, description="stream: only CA-Stream learns (frozen backbone, BN and head); full: every parameter. "
        "None: stream for ca-stream, full for gap."
    )
    model_name: str = Field("resnet50", description="timm classifier (when not starting from init).")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra timm.create_model arguments.")
    init: str | None = Field(None, description="foveal checkpoint (gap- or ca-stream-classifier) to start from.")
    weights: str | None = Field(None, description="Local timm weights file of the classifier (instead of init).")
    num_classes: int | None = Field(None, gt=0, description="Classes; None = number of class folders.")
    heads: int = Field(1, gt=0, description="CA-Stream attention heads.")
    single_block: bool = Field(False, description="CA-Stream with one block after the last stage.")
    qk_proj: bool = Field(False, description="CA-Stream query/key projections.")
    epochs: int = Field(90, gt=0, description="Number of epochs.")
    batch_size: int = Field(64, gt=0, description="Batch size per process.")
    lr: float = Field(0.1, gt=0, description="SGD learning rate.")
    momentum: float = Field(0.9, ge=0, description="SGD momentum.")
    weight_decay: float = Field(1e-4, ge=0, description="SGD weight decay.")
    lr_step: int = Field(30, gt=0, description="Step schedule: multiply the lr by lr_gamma every lr_step epochs.")
    lr_gamma: float = Field(0.1, gt=0, description="Step schedule factor.")
    image_size: int = Field(224, gt=0, description="Training / evaluation crop size.")
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="Area range of the random resized crop.")
    workers: int = Field(4, ge=0, description="DataLoader worker processes.")
    seed: int = Field(0, description="Seed of initialisation, shuffling and augmentation.")
    device: str | None = Field(None, description="Device; None = cuda when available, else cpu.")
    resume: bool = Field(False, description="Continue the run in <out> (from <out>/last.safetensors) if there is one.")
    overwrite: bool = Field(False, description="Delete the run in <out> (checkpoints, log.jsonl) and start afresh.")
    progress: bool = Field(True, description="Show tqdm progress bars.")


def build_classifier(cfg: ClassifierTrainConfig, num_classes: int) -> nn.Module:
    """The model to train: from ``init`` (a GAP classifier gets CA-Stream wrapped around it when
    ``pooling="ca-stream"``), else a fresh ``<pooling>-classifier`` of ``model_name``."""
    from ..models.ca_stream import TimmClassifier, wrap_classifier

    stream = {"heads": cfg.heads, "single_block": cfg.single_block, "qk_proj": cfg.qk_proj}
    if cfg.init:
        model = load(cfg.init)
        if not isinstance(model, TimmClassifier):
            raise InputError(
                f"init: {cfg.init} holds a {type(model).__name__}, expected a gap- or ca-stream-classifier"
            )
        if cfg.pooling == "ca-stream" and model.pool is None:
            model = wrap_classifier(model, **stream)
        elif cfg.pooling == "gap" and model.pool is not None:
            raise InputError(f"init: {cfg.init} is a ca-stream-classifier, but pooling='gap' was asked for")
    else:
        extra = stream if cfg.pooling == "ca-stream" else {}
        model = registry.build(f"{cfg.pooling}-classifier", model_name=cfg.model_name, num_classes=num_classes,
                               model_kwargs=cfg.model_kwargs, weights=cfg.weights, **extra)
    if model.config.num_classes != num_classes:
        raise InputError(f"the classifier has {model.config.num_classes} classes, the dataset {num_classes}")
    return model


def freeze_for_stream(model: nn.Module) -> list[nn.Parameter]:
    """Freeze everything but the CA-Stream (``requires_grad=False``); returns the stream's
    parameters. The caller keeps ``model.net`` in eval mode so BN statistics stay fixed."""
    params = model.stream_parameters()
    if not params:
        raise InputError("train_mode='stream' needs a ca-stream-classifier (the GAP model has no stream to train)")
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return params


def set_train_mode(model: nn.Module, mode: str) -> None:
    """``model.train()``, with the frozen network back in eval mode for stream training."""
    model.train()
    if mode == "stream":
        unwrap(model).net.eval()


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader, device: torch.device | str, progress: bool = False) -> dict:
    """Mean cross-entropy and top-1 accuracy of ``model`` (in eval mode) over ``loader``."""
    was = model.training
    model.eval()
    loss = correct = n = 0.0
    for images, targets in tqdm(loader, desc="eval", leave=False, disable=not progress):
        images, targets = images.to(device), targets.to(device)
        logits = model(images)
        loss += float(F.cross_entropy(logits, targets, reduction="sum"))
        correct += float((logits.argmax(1) == targets).sum())
        n += len(targets)
    model.train(was)
    return {"loss": loss / max(n, 1), "acc": correct / max(n, 1), "count": int(n)}


def train_classifier(config: ClassifierTrainConfig | dict | None = None, **overrides: Any) -> dict[str, Any]:
    """Train (see the module docstring). Returns ``{"model", "history", "checkpoint", "model_path"}``
    with the trained (unwrapped) model and the JSONL records of the completed epochs."""
    values = config.model_dump() if isinstance(config, ClassifierTrainConfig) else dict(config or {})
    cfg = ClassifierTrainConfig(**{**values, **overrides})
    mode = cfg.train_mode or ("stream" if cfg.pooling == "ca-stream" else "full")
    run = TrainingRun(cfg.out, epochs=cfg.epochs, resume=cfg.resume, overwrite=cfg.overwrite, device=cfg.device,
                      log_name="log.jsonl", outputs=("model.safetensors",), progress=cfg.progress)
    device = run.device

    seed_everything(cfg.seed)
    train_set = ImageFolderDataset(split_folder(cfg.data, "train"), train=True, image_size=cfg.image_size,
                                   crop_scale=cfg.crop_scale)
    val_root = Path(cfg.data) / "val"
    val_set = (ImageFolderDataset(val_root, image_size=cfg.image_size, classes=train_set.classes)
               if val_root.is_dir() else None)
    num_classes = cfg.num_classes or len(train_set.classes)

    model = build_classifier(cfg, num_classes).to(device)
    params = freeze_for_stream(model) if mode == "stream" else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    run.start(model, optimizer, scheduler,
                identity={"model": model.registry_name, "model_config": checkpoint_config(model)})
    net = run.wrap(model, broadcast_buffers=mode == "full")
    sampler = (DistributedSampler(train_set, num_replicas=run.world, rank=run.rank, shuffle=True, seed=cfg.seed)
               if run.world > 1 else None)
    val_loader = (DataLoader(val_set, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers)
                  if val_set is not None else None)
    model_path = run.out / "model.safetensors"

    def batches(epoch: int) -> DataLoader:
        set_train_mode(net, mode)
        gen = torch.Generator().manual_seed(cfg.seed + epoch)
        return DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, shuffle=sampler is None,
                          num_workers=cfg.workers, generator=gen, drop_last=False)

    def step(batch) -> dict[str, Any]:
        images, targets = (t.to(device, non_blocking=True) for t in batch)
        logits = net(images)
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach().double() * len(targets), "correct": (logits.argmax(1) == targets).sum(),
                "count": len(targets)}

    def summarize(sums: dict[str, float]) -> dict[str, Any]:
        return {"step": run.step, "train_loss": sums["loss"] / sums["count"],
                "train_acc": sums["correct"] / sums["count"]}

    def evaluate() -> dict[str, float]:
        metrics = evaluate_classifier(model, val_loader, device)
        return {"val_loss": metrics["loss"], "val_acc": metrics["acc"]}

    history = run.fit(batches, step, summarize=summarize, evaluate=evaluate if val_loader is not None else None,
                      export=lambda: save(model, model_path))
    model.eval()
    return {"model": model, "history": history, "checkpoint": run.last, "model_path": model_path}
