"""Weakly-supervised semantic segmentation from ViT explanations (vit-lrp-affinitynet.txt 4.3, 5.3).

Pipeline (:func:`run_wsss`), with image-level labels only:

1. train a ViT classifier (multi-label, binary cross-entropy) on the images;
2. explanation seeds ``M_c`` for every class present in an image (``vit-lrp`` by default, one
   map per class in [0, 1]);
3. affinity labels from the seeds (alpha_low / alpha_high, optional dense CRF) and training of an
   ``affinitynet`` refiner (:mod:`foveal.training.affinity`);
4. random walk of the seeds along the learned affinities -> refined class scores -> pseudo-masks;
5. mIoU of the seed masks and of the refined pseudo-masks against the ground truth (never seen
   by steps 1-4), on the training images as in Ahn & Kwak's pseudo-label evaluation.

Seed masks are the argmax of the same scores the random walk starts from,
``[(1 - max_c M_c)^walk_alpha, M_1, ..., M_K]``, so the two mIoUs isolate the refinement. The
class-agnostic seed maps are also scored with the ``saliency-segmentation`` metric (Table 3's
pixel accuracy / mAP / mIoU) when it is registered.

By default everything runs on the synthetic :class:`~foveal.data.multiobject.MultiObjectDataset`
with tiny models (CPU, a few minutes); the ViT is any timm ViT (``vit_base_patch16_224``, the
hybrid ``vit_base_r50_s16_224``, ...) via ``vit`` / ``vit_kwargs``.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from .. import registry
from ..core.errors import InputError
from ..core.tensors import resolve_device
from ..core.training import seed_everything
from ..data.multiobject import MultiObjectDataset
from ..refine.seeds import background_scores
from ..training.affinity import train_affinitynet
from ..viz import grid, heatmap_overlay, label_overlay, save_image


class WSSSConfig(BaseModel):
    """Settings of :func:`run_wsss` (all have defaults: a CPU-sized synthetic run)."""

    model_config = ConfigDict(extra="forbid")

    out: str | None = Field(None, description="Output folder (checkpoints, examples.png, result.json); None = temp.")
    images: int = Field(64, gt=0, description="Synthetic training images.")
    size: int = Field(64, ge=16, description="Image size (pixels).")
    num_classes: int = Field(3, ge=1, le=8, description="Object classes.")
    max_objects: int = Field(3, ge=1, description="Objects per image (1..max_objects).")
    seed: int = Field(0, description="Seed of the data, the initialisations and the training.")
    vit: str = Field("vit_tiny_patch16_224", description="timm ViT of the classifier (random init).")
    vit_kwargs: dict[str, Any] = Field(
        default_factory=lambda: {"patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4},
        description="Extra timm.create_model arguments of the ViT (img_size and num_classes are set).")
    cls_epochs: int = Field(30, gt=0, description="Classifier epochs.")
    cls_lr: float = Field(1e-3, gt=0, description="Classifier AdamW learning rate.")
    cls_batch_size: int = Field(16, gt=0, description="Classifier batch size.")
    explainer: str = Field("vit-lrp", description="Registered explainer giving the seeds.")
    explainer_options: dict[str, Any] = Field(default_factory=dict, description="Explainer config overrides.")
    affinity_options: dict[str, Any] = Field(
        default_factory=lambda: {"backbone_options": {"model_name": "resnet10t"}, "levels": [1, 2, 3],
                                 "level_channels": [16, 32, 64], "feature_dim": 64, "walk": "sparse"},
        description="affinitynet config overrides (backbone, levels, alphas, crf, beta, steps, walk).")
    aff_epochs: int = Field(8, gt=0, description="AffinityNet epochs.")
    aff_lr: float = Field(0.1, gt=0, description="AffinityNet base learning rate.")
    aff_batch_size: int = Field(8, gt=0, description="AffinityNet batch size.")
    examples: int = Field(6, ge=0, description="Images in the example figure.")
    device: str | None = Field(None, description="Device; None = cuda when available, else cpu.")
    progress: bool = Field(True, description="Show progress bars.")


@dataclass
class WSSSResult:
    """What :func:`run_wsss` measured and produced."""

    seed_miou: float
    refined_miou: float
    seed_iou: list[float]
    refined_iou: list[float]
    classes: list[str]
    classifier_accuracy: float
    seed_saliency: dict[str, float]
    seeds: torch.Tensor = field(repr=False)
    seed_masks: torch.Tensor = field(repr=False)
    pseudo_masks: torch.Tensor = field(repr=False)
    examples: np.ndarray | None = field(default=None, repr=False)
    history: dict[str, list] = field(default_factory=dict, repr=False)
    classifier: Any = field(default=None, repr=False)
    refiner: Any = field(default=None, repr=False)
    data: MultiObjectDataset | None = field(default=None, repr=False)
    out: str | None = None

    def summary(self) -> dict[str, Any]:
        return {"seed_miou": self.seed_miou, "refined_miou": self.refined_miou,
                "seed_iou": dict(zip(["background", *self.classes], self.seed_iou)),
                "refined_iou": dict(zip(["background", *self.classes], self.refined_iou)),
                "classifier_accuracy": self.classifier_accuracy, "seed_saliency": self.seed_saliency}


def confusion_miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[float, list[float]]:
    """Dataset mIoU from a pooled confusion matrix (VOC convention): IoU_c = TP / (TP + FP + FN),
    averaged over classes with a non-empty union; per-class IoUs (NaN when the union is empty)."""
    if pred.shape != target.shape:
        raise InputError(f"confusion_miou: predictions {tuple(pred.shape)} and targets {tuple(target.shape)} differ")
    idx = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    cm = torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes).double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    return float(iou[union > 0].mean()), iou.tolist()


def train_vit_classifier(data: MultiObjectDataset, cfg: WSSSConfig, device: torch.device) -> tuple[Any, list]:
    """Multi-label ViT from image-level labels only (BCE, AdamW, horizontal flips)."""
    import timm

    model = timm.create_model(cfg.vit, pretrained=False, num_classes=len(data.classes), img_size=cfg.size,
                              **cfg.vit_kwargs).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.cls_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.cls_epochs)
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    bar = tqdm(range(cfg.cls_epochs), desc="vit classifier", disable=not cfg.progress)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(data), generator=gen)
        total = 0.0
        for i in range(0, len(data), cfg.cls_batch_size):
            idx = order[i : i + cfg.cls_batch_size]
            x, y = data.images[idx].to(device), data.labels[idx].to(device)
            flip = (torch.rand(len(idx), generator=gen) < 0.5).to(device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.binary_cross_entropy_with_logits(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        sched.step()
        history.append({"epoch": epoch + 1, "loss": total / len(data)})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    model.eval()
    return model, history


def explanation_seeds(model, images: torch.Tensor, labels: torch.Tensor, explainer, batch_size: int = 16,
                      progress: bool = False) -> torch.Tensor:
    """Seeds (N, K, H, W) in [0, 1]: ``explainer`` maps of each class present in each image
    (image-level labels), zero for absent classes."""
    n, k = labels.shape
    seeds = torch.zeros(n, k, *images.shape[-2:])
    device = next(model.parameters()).device
    jobs = [(c, torch.nonzero(labels[:, c] > 0)[:, 0]) for c in range(k)]
    bar = tqdm(total=int((labels > 0).sum()), desc="seeds", disable=not progress)
    for c, idx in jobs:
        for i in range(0, len(idx), batch_size):
            part = idx[i : i + batch_size]
            seeds[part, c] = explainer.explain(model, images[part].to(device), c).cpu()
            bar.update(len(part))
    bar.close()
    return seeds


def run_wsss(config: WSSSConfig | dict | None = None, **overrides: Any) -> WSSSResult:
    """Run the pipeline of the module docstring; returns a :class:`WSSSResult`."""
    values = config.model_dump() if isinstance(config, WSSSConfig) else dict(config or {})
    cfg = WSSSConfig(**{**values, **overrides})
    device = resolve_device(cfg.device, "device")
    tmp = None
    if cfg.out is None:
        tmp = tempfile.TemporaryDirectory()
    out = Path(cfg.out or tmp.name)
    try:
        seed_everything(cfg.seed)
        data = MultiObjectDataset(cfg.images, size=cfg.size, num_classes=cfg.num_classes,
                                  max_objects=cfg.max_objects, seed=cfg.seed)
        vit, cls_history = train_vit_classifier(data, cfg, device)
        with torch.no_grad():
            logits = torch.cat([vit(data.images[i : i + 64].to(device)).cpu() for i in range(0, len(data), 64)])
        accuracy = float(((logits > 0).float() == data.labels).float().mean())

        explainer = registry.build(cfg.explainer, **cfg.explainer_options)
        seeds = explanation_seeds(vit, data.images, data.labels, explainer, progress=cfg.progress)

        torch.manual_seed(cfg.seed)
        refiner = registry.build("affinitynet", **cfg.affinity_options).to(device)
        trained = train_affinitynet(refiner, data.images, seeds, out=str(out / "affinitynet"), epochs=cfg.aff_epochs,
                                    lr=cfg.aff_lr, batch_size=cfg.aff_batch_size, seed=cfg.seed,
                                    progress=cfg.progress)
        walk_alpha = refiner.config.walk_alpha
        seed_masks = background_scores(seeds, walk_alpha).argmax(1)
        refined = []
        for i in tqdm(range(0, len(data), 8), desc="random walk", disable=not cfg.progress):
            refined.append(refiner.refine(data.images[i : i + 8].to(device), seeds[i : i + 8].to(device)).cpu())
        pseudo = torch.cat(refined).argmax(1)

        k = cfg.num_classes + 1
        seed_miou, seed_iou = confusion_miou(seed_masks, data.masks, k)
        refined_miou, refined_iou = confusion_miou(pseudo, data.masks, k)
        saliency = {}
        if registry.has("saliency-segmentation"):
            maps, fg = seeds.amax(1), data.masks > 0
            for q in ("pixel-accuracy", "ap", "miou"):
                metric = registry.build("saliency-segmentation", quantity=q)
                saliency[q] = float(metric.score(maps, fg))
        examples = example_figure(data, seeds, seed_masks, pseudo, cfg.examples) if cfg.examples else None
        result = WSSSResult(
            seed_miou=seed_miou, refined_miou=refined_miou, seed_iou=seed_iou, refined_iou=refined_iou,
            classes=data.classes, classifier_accuracy=accuracy, seed_saliency=saliency, seeds=seeds,
            seed_masks=seed_masks, pseudo_masks=pseudo, examples=examples,
            history={"classifier": cls_history, "affinitynet": trained["history"]}, classifier=vit,
            refiner=refiner, data=data, out=cfg.out,
        )
        if cfg.out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "result.json").write_text(json.dumps(result.summary(), indent=2, default=float))
            if examples is not None:
                save_image(examples, out / "examples.png")
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def example_figure(data: MultiObjectDataset, seeds: torch.Tensor, seed_masks: torch.Tensor,
                   pseudo: torch.Tensor, n: int) -> np.ndarray:
    """Rows of image | ground truth | seed map | seed mask | refined pseudo-mask (uint8 RGB)."""
    rows = []
    for i in range(min(n, len(data))):
        rgb = data.rgb[i]
        rows.append([
            rgb, label_overlay(rgb, data.masks[i].numpy()), heatmap_overlay(rgb, seeds[i].amax(0).numpy()),
            label_overlay(rgb, seed_masks[i].numpy()), label_overlay(rgb, pseudo[i].numpy()),
        ])
    return grid(rows, col_labels=["image", "truth", "seeds", "seed mask", "refined"])
