"""Training AffinityNet on affinity labels derived from explanation seeds.

Settings follow ``vit-lrp-affinitynet.txt`` section 5.4 and the authors' ``psa/train_aff.py``:
SGD (psa's optimiser has no effective momentum), learning rate 0.1 with polynomial decay
(power 0.9) over all steps, 10x the rate for the new affinity layers, weight decay 1e-4, batch
size 8, random horizontal flips (image and label map together). The label maps are computed
once from the seeds before training (as psa precomputes its CRF label files).

Every epoch writes ``<out>/last.safetensors`` (model, optimizer, scheduler, epoch, RNG states;
:mod:`foveal.core.training`) and ``<out>/affinitynet.safetensors`` (the refiner as a foveal
component, ``foveal.load``-able); ``resume=True`` continues exactly where the last completed
epoch ended (shuffling and flips come from a generator seeded with ``seed + epoch``). One JSON
line per epoch goes to ``<out>/log.jsonl``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from ..core.errors import InputError
from ..core.training import MetricsLog, load_training_state, save_training_state, seed_everything
from ..models.affinitynet import AffinityNet
from ..registry.checkpoints import save


class AffinityTrainConfig(BaseModel):
    """Settings of :func:`train_affinitynet`."""

    model_config = ConfigDict(extra="forbid")

    out: str = Field(description="Output folder (checkpoints, log.jsonl).")
    epochs: int = Field(8, gt=0, description="Epochs (psa 8, the replication 7).")
    batch_size: int = Field(8, gt=0, description="Batch size.")
    lr: float = Field(0.1, gt=0, description="Base learning rate of the backbone (new layers get 10x).")
    head_lr_mult: float = Field(10.0, gt=0, description="Learning-rate factor of the new affinity layers.")
    weight_decay: float = Field(1e-4, ge=0, description="SGD weight decay.")
    momentum: float = Field(0.0, ge=0, description="SGD momentum (psa: none).")
    poly_power: float = Field(0.9, ge=0, description="Polynomial learning-rate decay power over all steps.")
    flip: bool = Field(True, description="Random horizontal flips of image and label map.")
    seed: int = Field(0, description="Seed of shuffling and flips.")
    device: str | None = Field(None, description="Device; None = the refiner's device.")
    resume: bool = Field(False, description="Continue from <out>/last.safetensors if it exists.")
    progress: bool = Field(True, description="Show a tqdm progress bar.")


@torch.no_grad()
def compute_label_maps(refiner: AffinityNet, images: torch.Tensor, seeds: torch.Tensor,
                       batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """Affinity label maps (N, h, w) for a whole set (see :meth:`AffinityNet.label_map`)."""
    device = next(refiner.parameters()).device
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="affinity labels", disable=not progress, leave=False):
        out.append(refiner.label_map(images[i : i + batch_size].to(device), seeds[i : i + batch_size].to(device)).cpu())
    return torch.cat(out)


def train_affinitynet(
    refiner: AffinityNet, images: torch.Tensor, seeds: torch.Tensor | None = None, *,
    label_maps: torch.Tensor | None = None, config: AffinityTrainConfig | dict | None = None, **overrides: Any,
) -> dict[str, Any]:
    """Train ``refiner`` in place on ``images`` (N, 3, H, W) with affinity labels from ``seeds``
    (N, K, H, W) in [0, 1] (or precomputed ``label_maps`` (N, h, w)). Returns ``{"model",
    "history", "checkpoint", "model_path", "label_maps"}``; ``history`` holds the JSONL records."""
    values = config.model_dump() if isinstance(config, AffinityTrainConfig) else dict(config or {})
    cfg = AffinityTrainConfig(**{**values, **overrides})
    if not isinstance(refiner, AffinityNet):
        raise InputError(f"train_affinitynet: expected an AffinityNet, got {type(refiner).__name__}")
    device = torch.device(cfg.device) if cfg.device else next(refiner.parameters()).device
    refiner.to(device)
    if label_maps is None:
        if seeds is None:
            raise InputError("train_affinitynet: pass seeds (N, K, H, W) or label_maps (N, h, w)")
        label_maps = compute_label_maps(refiner, images, seeds, progress=cfg.progress)
    if len(label_maps) != len(images):
        raise InputError(f"train_affinitynet: {len(images)} images but {len(label_maps)} label maps")

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    head = {id(p) for p in refiner.head_parameters()}
    groups = [
        {"params": [p for p in refiner.parameters() if id(p) not in head], "lr": cfg.lr},
        {"params": refiner.head_parameters(), "lr": cfg.lr * cfg.head_lr_mult},
    ]
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(images) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (1 - min(step, total - 1) / total) ** cfg.poly_power)
    log = MetricsLog(out / "log.jsonl")
    last, model_path = out / "last.safetensors", out / "affinitynet.safetensors"

    seed_everything(cfg.seed)
    start = step = 0
    if cfg.resume and last.exists():
        state = load_training_state(last, model=refiner, optimizer=optimizer, scheduler=scheduler)
        start, step = int(state["epoch"]), int(state["step"])
        log.truncate_after(start)
    elif log.path.exists():
        log.path.unlink()

    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        refiner.train()
        gen = torch.Generator().manual_seed(cfg.seed + epoch)
        order = torch.randperm(len(images), generator=gen)
        flips = torch.rand(len(images), generator=gen) < 0.5
        sums: dict[str, float] = {}
        bar = tqdm(range(steps_per_epoch), desc=f"affinitynet {epoch + 1}/{cfg.epochs}", disable=not cfg.progress)
        for i in bar:
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            x, lab = images[idx].to(device), label_maps[idx].to(device)
            if cfg.flip:
                f = flips[idx].to(device)
                x = torch.where(f[:, None, None, None], x.flip(-1), x)
                lab = torch.where(f[:, None, None], lab.flip(-1), lab)
            loss, parts = refiner.loss(x, lab)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            parts["loss"] = float(loss.detach())
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{parts['loss']:.4f}")
        record = {"epoch": epoch + 1, "step": step, **{k: v / steps_per_epoch for k, v in sums.items()},
                  "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - t0}
        save_training_state(last, model=refiner, optimizer=optimizer, scheduler=scheduler, epoch=epoch + 1, step=step)
        save(refiner, model_path)
        log.write(**record)
    refiner.eval()
    return {"model": refiner, "history": log.read(), "checkpoint": last, "model_path": model_path,
            "label_maps": label_maps}
