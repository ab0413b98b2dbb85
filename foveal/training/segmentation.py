"""Polyp segmentation: structure loss, trainer (single process or torchrun DDP), evaluation and
prediction, following the protocol RTA-Former (rta-former.txt, section III.C) takes from PraNet
and Polyp-PVT: Adam, lr 1e-4, weight decay 1e-4, batch 8, 352x352 inputs, multi-scale training
at 0.75 / 1 / 1.25 with one optimiser step per scale, gradient clipping, 100 epochs, structure
loss.

Reference choices, kept on purpose:

* scale sizes are ``int(round(size * rate / 32) * 32)`` (Python's round, half to even: 352 ->
  256 / 352 / 448); images and masks are resized bilinearly with ``align_corners=True`` (soft
  masks at the other scales);
* gradient clipping clamps every gradient element to ``[-grad_clip, grad_clip]`` (PraNet /
  Polyp-PVT ``clip_gradient``, 0.5); ``clip_mode="norm"`` clips the global norm instead;
* the learning rate is multiplied by 0.1 every ``lr_decay_epochs`` (Polyp-PVT: 200, so constant
  over 100 epochs), stepped per epoch;
* ``batch_size`` is the global batch: with torchrun each of W processes takes batch_size / W;
* masks are read as the reference ``utils/dataloader.py`` reads them (:class:`PolypDataset`):
  for training the grey mask resized with PIL's bilinear filter and kept soft in [0, 1]; for
  evaluation the ground truth at its own size, binarised with ``> 128`` as the evaluation
  toolbox does;
* the encoder is ImageNet-pretrained in the paper ("a pre-trained PVTv2", sec. II.B): training
  without ``backbone_weights`` warns once (:func:`pretraining_warnings`) and records the warning
  in the first record of ``metrics.jsonl``.

Exact resume: each epoch's shuffling and flips come from generators seeded with
``(seed, epoch, rank)``, and ``<out>/last.safetensors`` (written atomically at the end of every
epoch) holds model, optimiser, scheduler, epoch and RNG states, so an interrupted run resumed
with ``resume=True`` produces the same weights as an uninterrupted one: bit for bit on the CPU; on
CUDA up to the run-to-run noise of cuDNN's non-deterministic kernels (atomic adds in the
convolution and bilinear-upsampling backward passes), the GPU generators being restored too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm.auto import tqdm

from .. import registry
from ..core.checkpoint import check_config_fields, load_state, load_weights
from ..core.errors import CheckpointError, InputError
from ..core.training import TrainingRun, seed_everything
from ..data.images import list_images, read_rgb, to_tensor
from ..data.polyp import PolypDataset, find_test_sets, train_folder
from ..metrics.segmentation import dice_iou, summarize_curves, threshold_curves
from ..registry.checkpoints import checkpoint_config, load, save

# --- loss --------------------------------------------------------------------------------------


def structure_loss(logits: torch.Tensor, mask: torch.Tensor, legacy: bool = False) -> torch.Tensor:
    """Structure loss of PraNet (Fan et al., MICCAI 2020, eq. 2) used by Polyp-PVT and RTA-Former:
    weighted BCE + weighted IoU with pixel weights ``1 + 5 |avgpool31(mask) - mask|`` (larger
    near boundaries). ``logits`` and ``mask`` (soft masks allowed): (B, 1, H, W).

    Weighted BCE = ``sum(w * bce) / sum(w)`` per image; weighted IoU = ``1 - (sum(w p m) + 1) /
    (sum(w (p + m)) - sum(w p m) + 1)`` with ``p = sigmoid(logits)``; both averaged over the batch.
    ``legacy=True`` reproduces the reference code, which calls ``binary_cross_entropy_with_logits(
    ..., reduce='none')``: PyTorch reads the legacy ``reduce`` flag (a truthy string) as "reduce",
    so its BCE is the plain batch mean and the weights cancel out."""
    if logits.shape != mask.shape or logits.dim() != 4:
        raise InputError(f"structure_loss: logits {tuple(logits.shape)} and mask {tuple(mask.shape)} "
                         "must both be (B, 1, H, W)")
    mask = mask.to(logits.dtype)
    weight = 1 + 5 * torch.abs(F.avg_pool2d(mask, kernel_size=31, stride=1, padding=15) - mask)
    if legacy:
        wbce = F.binary_cross_entropy_with_logits(logits, mask)  # scalar; weights cancel
    else:
        bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
        wbce = (weight * bce).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))
    prob = torch.sigmoid(logits)
    inter = (prob * mask * weight).sum(dim=(2, 3))
    union = ((prob + mask) * weight).sum(dim=(2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (wbce + wiou).mean()


def scale_size(size: int, rate: float) -> int:
    """Training size at ``rate`` as in Polyp-PVT: ``int(round(size * rate / 32) * 32)``."""
    return int(round(size * rate / 32) * 32)


# --- configuration -----------------------------------------------------------------------------


class TrainConfig(BaseModel):
    """Settings of :func:`train` (defaults: rta-former.txt section III.C / Polyp-PVT)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    data: str = Field(description="Dataset root (with TrainDataset/) or a folder with images/ and masks/.")
    out: str = Field(description="Output folder: last.safetensors, model.safetensors, metrics.jsonl.")
    model: str = Field("rta-former-s", description="Registered segmentation model name.")
    model_options: dict[str, Any] = Field({}, description="Config overrides of the model (num_classes, ...).")
    epochs: int = Field(100, ge=1, description="Number of epochs.")
    batch_size: int = Field(8, ge=1, description="Global batch size (split over torchrun processes).")
    lr: float = Field(1e-4, gt=0, description="Learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay.")
    optimizer: Literal["adam", "adamw"] = Field("adam", description="Adam (paper) or AdamW.")
    size: int = Field(352, ge=32, description="Training size (square).")
    scales: list[float] = Field([0.75, 1.0, 1.25], min_length=1, description="Multi-scale rates, one step each.")
    grad_clip: float | None = Field(0.5, gt=0, description="Gradient clipping threshold (None = off).")
    clip_mode: Literal["value", "norm"] = Field("value", description="Clamp elements (reference) or the norm.")
    lr_decay_epochs: int = Field(200, ge=1, description="Multiply the lr by 0.1 every this many epochs.")
    augment: bool = Field(True, description="Random horizontal/vertical flips.")
    legacy_loss: bool = Field(False, description="Reference structure loss with unweighted BCE.")
    seed: int = Field(0, description="Seed of initialisation, shuffling and flips.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    resume: bool = Field(False, description="Continue the run in <out> (from <out>/last.safetensors) if there is one.")
    overwrite: bool = Field(False, description="Delete the run in <out> (checkpoints, metrics.jsonl) and start afresh.")
    device: str | None = Field(None, description="Device (default: cuda:LOCAL_RANK if available, else cpu).")
    progress: bool = Field(True, description="Show progress bars (main process only).")


# --- training ----------------------------------------------------------------------------------


def _check_binary(model: nn.Module) -> None:
    if getattr(model, "task", "segmentation") != "segmentation":
        raise InputError(f"expected a segmentation model, got task {model.task!r}")
    k = getattr(getattr(model, "config", None), "num_classes", 1)
    if k != 1:
        raise InputError(f"polyp training/evaluation is binary and needs num_classes=1, the model has {k}")


def _flip(images: torch.Tensor, masks: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    b = images.shape[0]
    h = torch.rand(b, generator=gen) < 0.5
    v = torch.rand(b, generator=gen) < 0.5
    for flags, dim in ((h, 3), (v, 2)):
        sel = flags.view(b, 1, 1, 1).to(images.device)
        images = torch.where(sel, images.flip(dim), images)
        masks = torch.where(sel, masks.flip(dim), masks)
    return images, masks


def _clip(model: nn.Module, cfg: TrainConfig) -> None:
    if cfg.grad_clip is None:
        return
    if cfg.clip_mode == "norm":
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    else:
        nn.utils.clip_grad_value_(model.parameters(), cfg.grad_clip)


def _build_optimizer(model: nn.Module, cfg: TrainConfig):
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    optimizer = cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_decay_epochs, gamma=0.1)
    return optimizer, scheduler


def train(config: TrainConfig | dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """Train a segmentation model on a polyp dataset; returns ``{"model", "history", "out"}``.

    The epochs run in the shared skeleton :class:`~foveal.core.training.TrainingRun`: an ``out``
    that already holds a run needs ``resume=True`` (continue) or ``overwrite=True`` (start
    afresh); ``<out>/last.safetensors`` and ``<out>/model.safetensors`` are rewritten atomically
    after every epoch, one JSON record per epoch goes to ``<out>/metrics.jsonl``.

    Run under ``torchrun --nproc_per_node N`` for distributed data parallel training (gloo on
    CPU, nccl on GPU); only rank 0 writes files. Replicas stay identical: gradients are averaged
    by DDP, and BatchNorm running statistics are broadcast from rank 0 at the end of every epoch.
    """
    values = config.model_dump() if isinstance(config, TrainConfig) else dict(config or {})
    cfg = TrainConfig(**{**values, **overrides})
    run = TrainingRun(cfg.out, epochs=cfg.epochs, resume=cfg.resume, overwrite=cfg.overwrite, device=cfg.device,
                      outputs=("model.safetensors", "eval.json"), progress=cfg.progress)
    if cfg.batch_size % run.world:
        raise InputError(f"batch_size {cfg.batch_size} must be divisible by the {run.world} processes")
    device = run.device

    seed_everything(cfg.seed)
    model = registry.build(cfg.model, **cfg.model_options)
    _check_binary(model)
    model.to(device)
    dataset = PolypDataset(train_folder(cfg.data), size=cfg.size)
    optimizer, scheduler = _build_optimizer(model, cfg)
    run.start(model, optimizer, scheduler,
                identity={"model": model.registry_name, "model_config": checkpoint_config(model)})
    net = run.wrap(model)
    sizes = [scale_size(cfg.size, r) for r in cfg.scales]
    sampler = (DistributedSampler(dataset, num_replicas=run.world, rank=run.rank, shuffle=True, seed=cfg.seed)
               if run.world > 1 else None)
    flip_gen = torch.Generator()

    def batches(epoch: int) -> DataLoader:
        net.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        flip_gen.manual_seed((cfg.seed * 1_000_003 + epoch) * 1009 + run.rank)
        return DataLoader(dataset, batch_size=cfg.batch_size // run.world,
                          sampler=sampler or RandomSampler(dataset, generator=gen),
                          num_workers=cfg.num_workers, generator=gen)

    def step(batch) -> dict[str, Any]:
        images, masks, _ = batch
        images, masks = images.to(device), masks.to(device)
        if cfg.augment:
            images, masks = _flip(images, masks, flip_gen)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for s in sizes:  # one optimiser step per scale (Polyp-PVT)
            x, y = images, masks
            if s != images.shape[-1] or s != images.shape[-2]:
                x = F.interpolate(images, size=(s, s), mode="bilinear", align_corners=True)
                y = F.interpolate(masks, size=(s, s), mode="bilinear", align_corners=True)
            loss = structure_loss(net(x), y, legacy=cfg.legacy_loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _clip(net, cfg)
            optimizer.step()
            total += loss.detach().double()
        return {"loss": total, "steps": len(sizes)}

    def summarize(sums: dict[str, float]) -> dict[str, Any]:
        # mean loss over every optimiser step; "steps" counts one process's steps
        return {"loss": sums["loss"] / max(sums["steps"], 1), "steps": int(sums["steps"]) // run.world}

    history = run.fit(batches, step, summarize=summarize, export=lambda: save(model, run.out / "model.safetensors"),
                      warnings=pretraining_warnings(model))
    return {"model": model, "history": history, "out": run.out}


def pretraining_warnings(model: nn.Module) -> list[str]:
    """The warning :func:`train` issues (once, and in the first record of ``metrics.jsonl``) when
    the encoder starts from random weights: RTA-Former uses "a pre-trained PVTv2" (rta-former.txt
    sec. II.B), the ImageNet-1k PVTv2 weights that Polyp-PVT, whose protocol sec. III.C follows,
    loads. Any model whose config has ``backbone_weights`` is checked; others get no warning."""
    config = getattr(model, "config", None)
    if config is None or "backbone_weights" not in type(config).model_fields:
        return []
    if config.backbone_weights or (getattr(config, "backbone_options", None) or {}).get("weights"):
        return []
    backbone = getattr(config, "backbone", "")
    weights = backbone.replace("-", "_") + ".pth" if backbone.startswith("pvt-v2-") else "WEIGHTS"
    name = getattr(model, "registry_name", None) or type(model).__name__
    return [f"{name}: the encoder ({backbone or 'backbone'}) starts from random weights, while the paper "
            "(rta-former.txt sec. II.B, III.C) trains from an ImageNet-pretrained PVTv2; pass --backbone-weights "
            f"{weights} (backbone_weights=...) with the official PVTv2 weights to compare with its results"]


# --- loading, evaluation, prediction -----------------------------------------------------------


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """A model from ``model.safetensors`` (:func:`foveal.save`) or a training state
    ``last.safetensors`` (rebuilt from the model name and config stored in it)."""
    try:
        return load(path, map_location=device)
    except CheckpointError as first:
        try:
            state = load_state(path)
        except CheckpointError:
            raise first from None
        extra = state.get("extra") or {}
        if "model" not in extra:
            raise CheckpointError(f"{path}: training state without the model name; cannot rebuild the model") from None
        cls = registry.entry(extra["model"]).cls
        config = extra.get("model_config", {})
        check_config_fields(cls.Config, config, component=extra["model"], source=path)
        # initial weight files do not matter (the state's tensors replace them) and may be gone
        config = {k: v for k, v in config.items() if k not in cls.checkpoint_exclude}
        model = registry.build(extra["model"], **config)
        load_weights(model, state["model"], source=str(path))
        return model.to(device)


@torch.no_grad()
def predict_probabilities(model: nn.Module, image: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """Sigmoid probability (B, H, W) at ``out_size`` for normalised images (B, 3, h, w)."""
    logits = model(image)
    if logits.shape[1] != 1:
        raise InputError(f"expected one output channel (binary polyp), got {logits.shape[1]}")
    logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    return torch.sigmoid(logits)[:, 0]


def evaluate(
    model: nn.Module,
    data: str | os.PathLike,
    *,
    size: int = 352,
    datasets: Iterable[str] | None = None,
    num_thresholds: int = 256,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Evaluate on every test dataset of ``data`` (``TestDataset/<name>/{images,masks}``): each
    image resized to ``size``, the probability upsampled to the mask's own resolution, then the
    polyp-benchmark meanDice / meanIoU and Dice / IoU at 0.5 (:mod:`foveal.metrics.segmentation`).
    Returns ``{dataset: summary}``; the model's train/eval mode is restored."""
    _check_binary(model)
    folders = find_test_sets(data)
    if datasets is not None:
        wanted = list(datasets)
        unknown = [d for d in wanted if d not in folders]
        if unknown:
            raise InputError(f"unknown test datasets {unknown}; available: {sorted(folders)}")
        folders = {d: folders[d] for d in wanted}
    device = torch.device(device) if device else next(model.parameters()).device
    was_training = model.training
    model.eval()
    results = {}
    try:
        for name, folder in folders.items():
            ds = PolypDataset(folder, size=size, mask_size="original")
            dc, ic, d5, i5 = [], [], [], []
            for image, mask, _ in tqdm(ds, desc=name, disable=not progress, leave=False):
                m = mask.bool()
                prob = predict_probabilities(model, image[None].to(device), tuple(m.shape[-2:])).cpu()
                curves = threshold_curves(prob, m, num_thresholds)
                dc.append(curves[0])
                ic.append(curves[1])
                d, i = dice_iou(prob >= 0.5, m)
                d5.append(d)
                i5.append(i)
            results[name] = summarize_curves(torch.cat(dc), torch.cat(ic), torch.cat(d5), torch.cat(i5))
    finally:
        model.train(was_training)
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    """The evaluation results as an aligned text table (one row per dataset, plus the mean)."""
    cols = ("meanDice", "meanIoU", "dice@0.5", "iou@0.5")
    width = max([len("dataset"), *(len(n) for n in results)]) + 2
    lines = [f"{'dataset':<{width}}{'images':>8}" + "".join(f"{c:>10}" for c in cols)]
    for name, r in results.items():
        lines.append(f"{name:<{width}}{r['num_images']:>8}" + "".join(f"{r[c]:>10.4f}" for c in cols))
    if len(results) > 1:
        mean = {c: sum(r[c] for r in results.values()) / len(results) for c in cols}
        total = sum(r["num_images"] for r in results.values())
        lines.append(f"{'mean':<{width}}{total:>8}" + "".join(f"{mean[c]:>10.4f}" for c in cols))
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


@torch.no_grad()
def predict(
    model: nn.Module,
    inputs: str | os.PathLike,
    out: str | os.PathLike,
    *,
    size: int = 352,
    threshold: float = 0.5,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> list[Path]:
    """Segment every image of ``inputs`` (a file or folder; an ``images/`` sub-folder is used if
    present) and write ``OUT/masks/<stem>.png`` (0/255 at the image's size) and
    ``OUT/overlays/<stem>.png`` (mask tinted over the image). Returns the mask paths."""
    from ..viz import mask_overlay, save_image

    _check_binary(model)
    src = Path(inputs)
    if src.is_dir():
        folder = next((src / d for d in ("images", "image") if (src / d).is_dir()), src)
        files = list_images(folder)
    elif src.exists():
        files = [src]
    else:
        raise FileNotFoundError(f"input not found: {src}")
    if not files:
        raise InputError(f"{src}: no images found")
    device = torch.device(device) if device else next(model.parameters()).device
    out = Path(out)
    was_training = model.training
    model.eval()
    written = []
    try:
        for f in tqdm(files, desc="predict", disable=not progress, leave=False):
            rgb = read_rgb(f)
            x = to_tensor(read_rgb(f, (size, size)))[None].to(device)
            mask = (predict_probabilities(model, x, rgb.shape[:2])[0] >= threshold).cpu().numpy()
            written.append(save_image(mask, out / "masks" / f"{f.stem}.png"))
            save_image(mask_overlay(rgb, mask), out / "overlays" / f"{f.stem}.png")
    finally:
        model.train(was_training)
    return written
