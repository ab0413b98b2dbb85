"""A multi-label ViT classifier from image-level labels: the first step of weakly-supervised
segmentation (vit-lrp-affinitynet.txt sections 5.3-5.4; psa ``train_cls.py``).

* **Model**: any timm ViT (``vit_base_patch16_224``, the hybrid ``vit_base_r50_s16_224``, ...)
  with a K-way head, from a local ImageNet-pretrained weights file (``weights``; nothing is
  downloaded): the classifier head is replaced and the position embedding resampled to
  ``image_size`` (:func:`build_vit`).
* **Loss**: binary cross-entropy on the logits, averaged over classes and images, which is
  psa's ``multilabel_soft_margin_loss`` (the same function).
* **Settings** (section 5.4): SGD, lr 5e-3, weight decay 1e-4, batch 8, 20 epochs, images resized to
  448 x 448, random horizontal flips and colour jitter, mean = std = 0.5 (the ViT's own
  ``pretrained_cfg``); where the paper is silent, psa: polynomial decay (power 0.9) over all
  steps, no momentum (psa's ``PolyOptimizer``), ``ColorJitter(0.3, 0.3, 0.3, 0.1)``, ``drop_last``.
  ``optimizer="adamw"`` / ``schedule="cosine"`` is the built-in synthetic set's recipe.

The epochs run in the shared skeleton :class:`~foveal.core.training.TrainingRun`: every epoch
writes ``<out>/last.safetensors`` (resumable training state), one line of ``<out>/log.jsonl`` and
``<out>/classifier.safetensors`` (:func:`save_classifier`: the weights with the timm architecture,
classes, input size and normalisation in its metadata, read back by :func:`load_classifier`).
Under ``torchrun`` the model is wrapped in DDP and each process takes its share of the same global
batches; augmentations are drawn per (seed, epoch, index).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..core.checkpoint import atomic_save_file, read_checkpoint, read_state_dict
from ..core.errors import CheckpointError, InputError
from ..core.training import TrainingRun, seed_everything, unwrap
from ..data.images import to_tensor
from .augment import PSA_JITTER, color_jitter, fit_batch

CLASSIFIER_FORMAT = "foveal.wsss-classifier/1"


class MultiLabelTrainConfig(BaseModel):
    """Settings of :func:`train_multilabel` (defaults: vit-lrp-affinitynet.txt 5.4, else psa)."""

    model_config = ConfigDict(extra="forbid")

    out: str = Field(description="Output folder (last.safetensors, classifier.safetensors, log.jsonl).")
    vit: str = Field("vit_base_patch16_224", description="timm ViT architecture.")
    vit_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra timm.create_model arguments.")
    weights: str | None = Field(None, description="Local ImageNet-pretrained timm weights (.safetensors/.pth).")
    image_size: int = Field(448, ge=16, description="Square training / explanation input size (paper: 448).")
    epochs: int = Field(20, gt=0, description="Epochs (paper 20).")
    lr: float = Field(5e-3, gt=0, description="Learning rate (paper 5e-3).")
    batch_size: int = Field(8, gt=0, description="Global batch size (paper 8).")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="SGD (paper) or AdamW.")
    momentum: float = Field(0.0, ge=0, description="SGD momentum (psa: none).")
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay (paper 1e-4).")
    schedule: Literal["poly", "cosine"] = Field("poly", description="poly: psa's (1 - step/max)^0.9; cosine.")
    flip: bool = Field(True, description="Random horizontal flips.")
    color_jitter: tuple[float, float, float, float] | None = Field(PSA_JITTER, description="ColorJitter strengths.")
    mean: tuple[float, float, float] | None = Field(None, description="Normalisation; None = the ViT's pretrained_cfg.")
    std: tuple[float, float, float] | None = Field(None, description="Normalisation; None = the ViT's pretrained_cfg.")
    workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    seed: int = Field(0, description="Seed of the initialisation, shuffling and augmentation.")
    device: str | None = Field(None, description="Device; None = cuda:LOCAL_RANK when available, else cpu.")
    resume: bool = Field(False, description="Continue from <out>/last.safetensors if it exists.")
    overwrite: bool = Field(False, description="Delete the run in <out> (checkpoints, log.jsonl) and start afresh.")
    progress: bool = Field(True, description="Show progress bars (main process).")


class LabelledImages(Protocol):
    """Images with image-level labels: ``load(i)`` -> (id, uint8 RGB (H, W, 3), float (K,) labels)."""

    classes: list[str]

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[str, np.ndarray, torch.Tensor]: ...


# --- the model and its file ------------------------------------------------------------------------


def build_vit(name: str, num_classes: int, image_size: int, vit_kwargs: dict[str, Any] | None = None,
              weights: str | os.PathLike | None = None) -> nn.Module:
    """A timm ViT with a ``num_classes`` head at ``image_size``; ``weights``: a local timm weights file
    of the same architecture (any head, any input size): its head is dropped and its absolute position
    embedding resampled to this input size; any other missing or unexpected key is an error."""
    import timm

    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=image_size,
                                  **(vit_kwargs or {}))
    except (RuntimeError, TypeError, ValueError) as e:
        raise InputError(f"cannot build the ViT {name!r} with img_size={image_size}, {vit_kwargs or {}}: {e}") from e
    if weights:
        state = dict(read_state_dict(weights))
        head = model.pretrained_cfg.get("classifier") or "head"
        heads = (head,) if isinstance(head, str) else tuple(head)
        state = {k: v for k, v in state.items() if not any(k.startswith(h + ".") for h in heads)}
        own = model.state_dict()
        if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
            from timm.layers import resample_abs_pos_embed

            prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
            state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], tuple(model.patch_embed.grid_size),
                                                        num_prefix_tokens=prefix)
        missing = sorted(k for k in set(own) - set(state) if not any(k.startswith(h + ".") for h in heads))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or shapes:
            raise CheckpointError(f"{weights} does not fit the timm model {name!r} {vit_kwargs or {}}: missing "
                                  f"{missing[:8]}, unexpected {unexpected[:8]}, shape mismatches {shapes[:8]}")
        model.load_state_dict(state, strict=False)
    return model


def normalization(model: nn.Module, mean=None, std=None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``mean``/``std`` when given, else the ViT's ``pretrained_cfg`` values."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return (tuple(mean or cfg.get("mean", (0.5, 0.5, 0.5))), tuple(std or cfg.get("std", (0.5, 0.5, 0.5))))


def save_classifier(model: nn.Module, path: str | os.PathLike, info: dict[str, Any]) -> Path:
    """The trained ViT with what rebuilds it (``vit``, ``vit_kwargs``, ``classes``, ``image_size``,
    ``mean``, ``std``) in the safetensors metadata; atomic."""
    meta = {"format": CLASSIFIER_FORMAT, **{k: json.dumps(v) for k, v in info.items()}}
    return atomic_save_file(dict(unwrap(model).state_dict()), path, meta)


def load_classifier(path: str | os.PathLike, *, vit: str | None = None, vit_kwargs: dict | None = None,
                    classes: list[str] | None = None, image_size: int | None = None) -> tuple[nn.Module, dict]:
    """A classifier file of :func:`save_classifier` -> (model in eval mode, info). A plain timm state
    dict of a K-class ViT also works when ``vit``, ``classes`` and ``image_size`` describe it."""
    tensors, meta = read_checkpoint(path)
    if meta.get("format") == CLASSIFIER_FORMAT:
        info = {k: json.loads(v) for k, v in meta.items() if k != "format"}
    else:
        if not (vit and classes and image_size):
            raise CheckpointError(f"{path} is not a foveal WSSS classifier file (format {CLASSIFIER_FORMAT!r}); a "
                                  "plain timm state dict needs the architecture (--vit, --vit-kwargs), the classes "
                                  "and the input size")
        info = {"vit": vit, "vit_kwargs": vit_kwargs or {}, "classes": list(classes), "image_size": image_size}
    if classes is not None and list(info["classes"]) != list(classes):
        raise InputError(f"{path} classifies {info['classes']}, but the dataset's classes are {list(classes)}")
    model = build_vit(info["vit"], len(info["classes"]), int(info["image_size"]), info.get("vit_kwargs"))
    own = model.state_dict()
    if set(own) != set(tensors) or any(own[k].shape != tensors[k].shape for k in own):
        raise CheckpointError(f"{path} does not fit {info['vit']} {info.get('vit_kwargs') or {}} with "
                              f"{len(info['classes'])} classes at {info['image_size']} px")
    model.load_state_dict(tensors)
    info.setdefault("mean", None)
    info.setdefault("std", None)
    info["mean"], info["std"] = normalization(model, info["mean"], info["std"])
    return model.eval(), info


# --- data ------------------------------------------------------------------------------------------


def resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (size, size, 3), bilinear (the paper resizes VOC images to 448 x 448)."""
    if rgb.shape[:2] == (size, size):
        return rgb
    return np.array(Image.fromarray(rgb).resize((size, size), Image.BILINEAR), dtype=np.uint8)


class ClassifierDataset(Dataset):
    """``(image (3, S, S), labels (K,))`` items: resize, colour jitter, flip, normalise."""

    def __init__(self, images: LabelledImages, cfg: MultiLabelTrainConfig, mean, std) -> None:
        self.images, self.cfg, self.mean, self.std = images, cfg, mean, std
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        _, rgb, labels = self.images.load(index)
        rgb = resize_rgb(rgb, cfg.image_size)
        if cfg.color_jitter is not None:
            seed = int(np.random.default_rng([cfg.seed, self.epoch, index, 1]).integers(2**62))
            rgb = color_jitter(rgb, torch.Generator().manual_seed(seed), cfg.color_jitter)
        if cfg.flip and bool(np.random.default_rng([cfg.seed, self.epoch, index, 0]).integers(2)):
            rgb = rgb[:, ::-1]
        return to_tensor(np.ascontiguousarray(rgb), self.mean, self.std), torch.as_tensor(labels, dtype=torch.float32)


# --- training --------------------------------------------------------------------------------------


def train_multilabel(images: LabelledImages, config: MultiLabelTrainConfig | dict | None = None,
                     **overrides: Any) -> dict[str, Any]:
    """Fine-tune a ViT on ``images`` (module docstring). Returns ``{"model", "info", "history", "path"}``."""
    values = config.model_dump() if isinstance(config, MultiLabelTrainConfig) else dict(config or {})
    cfg = MultiLabelTrainConfig(**{**values, **overrides})
    run = TrainingRun(cfg.out, epochs=cfg.epochs, resume=cfg.resume, overwrite=cfg.overwrite, device=cfg.device,
                      log_name="log.jsonl", outputs=("classifier.safetensors",), progress=cfg.progress,
                      desc="classifier")
    if cfg.batch_size % run.world:
        raise InputError(f"batch_size {cfg.batch_size} must be divisible by the {run.world} processes")
    if len(images) < cfg.batch_size:
        cfg = cfg.model_copy(update={"batch_size": fit_batch(images, cfg.batch_size, run.world, "train_multilabel")})
    device = run.device
    seed_everything(cfg.seed)
    classes = list(images.classes)
    model = build_vit(cfg.vit, len(classes), cfg.image_size, cfg.vit_kwargs, cfg.weights).to(device)
    mean, std = normalization(model, cfg.mean, cfg.std)
    info = {"vit": cfg.vit, "vit_kwargs": cfg.vit_kwargs, "classes": classes, "image_size": cfg.image_size,
            "mean": list(mean), "std": list(std)}
    dataset = ClassifierDataset(images, cfg, mean, std)
    steps = len(images) // cfg.batch_size * cfg.epochs
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                                           weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.schedule == "poly":
        scheduler: Any = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (1 - min(s, steps - 1) / steps) ** 0.9)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    run.start(model, optimizer, scheduler, identity={"model": cfg.vit, "model_config": {
        k: info[k] for k in ("vit_kwargs", "classes", "image_size", "mean", "std")}})
    net = run.wrap(model)
    path = run.out / "classifier.safetensors"

    def batches(epoch: int) -> DataLoader:
        net.train()
        dataset.set_epoch(epoch)
        sampler = DistributedSampler(dataset, num_replicas=run.world, rank=run.rank, shuffle=True, seed=cfg.seed,
                                     drop_last=True)
        return DataLoader(dataset, batch_size=cfg.batch_size // run.world, sampler=sampler, drop_last=True,
                          num_workers=cfg.workers)

    def step(batch) -> dict[str, Any]:
        x, y = (t.to(device) for t in batch)
        loss = F.binary_cross_entropy_with_logits(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach().double()}

    history = run.fit(batches, step, export=lambda: save_classifier(model, path, info), scheduler_interval="step")
    model.eval()
    return {"model": model, "info": info, "history": history, "path": path}
