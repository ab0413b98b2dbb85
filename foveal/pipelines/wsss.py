"""Weakly-supervised semantic segmentation from ViT explanations (vit-lrp-affinitynet.txt 4.3,
5.3-5.4, Table 4), on PASCAL VOC 2012, any dataset with image-level labels, or the built-in
synthetic set.

Stages (:func:`run_wsss`; every one writes its results to ``out`` as it goes and is skipped or
continued by ``resume=True``; under ``torchrun`` the training stages run DDP and the per-image
stages are sharded, each process taking ``ids[rank::world]``):

1. ``classifier``: a timm ViT fine-tuned multi-label from the image-level labels (BCE; paper 5.4;
   :mod:`foveal.training.multilabel`) from local pretrained ``weights``, or a trained one given as
   ``classifier`` (then skipped). ``out/classifier/``.
2. ``seeds``: the explainer's map (``vit-lrp`` by default) of each class present in each image
   (image-level labels, as psa's ``infer_cls.py`` keeps only labelled classes), at the classifier's
   input size, resized bilinearly to the stored image size; one float16 ``out/seeds/<id>.npz``
   per image (:class:`~foveal.refine.store.SeedStore`), never all in memory.
3. ``affinity``: AffinityNet trained from the seeds on disk (:mod:`foveal.training.affinity`:
   alpha_low / alpha_high labels, colour jitter, psa's crops and flips, frozen BN and early layers,
   psa's parameter groups). ``out/affinitynet/``.
4. ``walk``: per image the random walk of its seeds along the learned affinities; label PNGs (VOC
   palette, 0 background, c + 1 class c, 255 ignore) in ``out/masks/<variant>/<id>.png`` for the
   variants ``seeds`` (argmax of the walk's own input ``[(1 - max_c M_c)^walk_alpha, M]``, so the
   two mIoUs isolate the refinement), ``refined`` (the pseudo-masks; pixels whose refined
   probability is below ``pseudo_ignore`` become 255) and, with the dense CRF (optional extra
   ``crf``), ``seeds_crf`` / ``refined_crf`` (psa's CRF parameters on those scores).
5. ``eval``: mIoU of every variant against the ground truth, from one confusion matrix pooled over
   the dataset (VOC convention: background + K classes, ground-truth 255 ignored, a predicted 255
   counts as a miss), per-class IoU; ``out/result.json``, ``out/report.html`` (per-class IoU,
   seed vs refined examples, timing per stage), ``out/examples.png``.

Data: ``dataset=None`` is the built-in synthetic multi-object set (64 px, in memory, tiny models:
the CPU demo, preset ``"synthetic"``); ``dataset="voc"`` + ``data_root`` reads PASCAL VOC 2012 via
:class:`~foveal.data.voc.VOCDataset` (``split`` ``train`` / ``train_aug`` / a list file; labels from
the masks or psa's ``cls_labels.npy``; masks only for evaluation), and any other kind of
:func:`~foveal.data.datasets.open_dataset` whose items carry ``labels`` (and ``mask`` for the
evaluation) works the same way (preset ``"voc"``: the paper's settings). ``eval_split`` (default
``split``) names the images that get pseudo-masks and mIoU (psa: train for pseudo-labels, val for
Table 4); seeds are made for both.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from .. import registry
from ..core.errors import InputError
from ..core.training import MetricsLog, init_distributed, is_main_process, seed_everything, training_device
from ..data.images import to_tensor
from ..data.multiobject import MultiObjectDataset
from ..data.voc import VOC_PALETTE
from ..refine.crf import crf_available, dense_crf, require_crf
from ..refine.pairs import IGNORE
from ..refine.seeds import background_scores
from ..refine.store import SeedStore, read_label_png, shard, write_label_png
from ..training.affinity import train_affinitynet
from ..training.augment import PSA_JITTER
from ..training.multilabel import load_classifier, resize_rgb, train_multilabel
from ..viz import grid, heatmap_overlay, save_image

STAGES = ("classifier", "seeds", "affinity", "walk", "eval")
VARIANTS = ("seeds", "seeds_crf", "refined", "refined_crf")
VARIANT_NAMES = {"seeds": "seeds", "seeds_crf": "seeds + CRF", "refined": "refined (AffinityNet)",
                 "refined_crf": "refined + CRF"}

#: Settings that differ between the built-in synthetic set and a real dataset; a field the user
#: sets wins, and ``affinity_options`` are merged key by key over the preset's.
PRESETS: dict[str, dict[str, Any]] = {
    "synthetic": {
        # tiny models trained from scratch on a CPU in minutes
        "vit": "vit_tiny_patch16_224", "vit_kwargs": {"patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4},
        "image_size": None, "cls_epochs": 30, "cls_lr": 1e-3, "cls_batch_size": 16, "cls_optimizer": "adamw",
        "cls_weight_decay": 0.05, "cls_schedule": "cosine", "cls_jitter": False,
        # random-init backbone: nothing to keep frozen (psa freezes a pretrained one); a 16 x 16 grid:
        # psa's border margins would drop 62 % of its positions and t = 256 over-smooths it (docs/wsss.md)
        "affinity_options": {"backbone_options": {"model_name": "resnet10t"}, "levels": [1, 2, 3],
                             "level_channels": [16, 32, 64], "feature_dim": 64, "walk": "sparse",
                             "freeze_bn": False, "freeze_levels": 0, "pairs": "all", "walk_preset": "paper"},
        "aff_epochs": 8, "aff_crop": None, "aff_jitter": False,
    },
    "voc": {
        # vit-lrp-affinitynet.txt 5.4: ViT fine-tuned 20 epochs, SGD lr 5e-3, batch 8, wd 1e-4, 448 px,
        # flips + colour jitter; AffinityNet 7 epochs, lr 0.1, batch 8, wd 1e-4; psa's crop 448
        "vit": "vit_base_patch16_224", "vit_kwargs": {}, "image_size": 448, "cls_epochs": 20, "cls_lr": 5e-3,
        "cls_batch_size": 8, "cls_optimizer": "sgd", "cls_weight_decay": 1e-4, "cls_schedule": "poly",
        "cls_jitter": True,
        "affinity_options": {"backbone_options": {"model_name": "resnet50"}, "levels": [-3, -2, -1],
                             "walk": "sparse"},
        "aff_epochs": 7, "aff_crop": 448, "aff_jitter": True,
    },
}
#: Fields that do not change any result (a resumed run may change them).
RUN_ONLY = ("out", "resume", "overwrite", "stop_after", "progress", "device", "workers", "examples")
#: What a run writes into ``out`` (``overwrite`` deletes these and nothing else).
RUN_FILES = ("config.json", "timing.jsonl", "result.json", "report.html", "examples.png")
RUN_FOLDERS = ("classifier", "seeds", "affinitynet", "masks")


class WSSSConfig(BaseModel):
    """Settings of :func:`run_wsss`. Fields marked "preset" default to :data:`PRESETS` (``"synthetic"``
    without a dataset, else ``"voc"``)."""

    model_config = ConfigDict(extra="forbid")

    out: str | None = Field(None, description="Output folder; None = a temporary folder (kept while the result lives).")
    resume: bool = Field(False, description="Continue the run in out (skip finished images and epochs).")
    overwrite: bool = Field(False, description="Delete the run in out (its files and folders only) and start afresh.")
    stop_after: Literal["classifier", "seeds", "affinity", "walk"] | None = Field(
        None, description="Stop after this stage (e.g. seeds only).")
    preset: Literal["synthetic", "voc"] | None = Field(None, description="None: synthetic without a dataset, else voc.")
    # data
    dataset: str | None = Field(None, description="open_dataset kind (voc, ...); None = the built-in synthetic set.")
    data_root: str | None = Field(None, description="Dataset root (VOC: the folder above VOCdevkit, or below).")
    split: str | None = Field(None, description="Training split or list file (VOC default: train).")
    eval_split: str | None = Field(None, description="Split that gets pseudo-masks and mIoU; None = split.")
    masks: Literal["auto", "class", "aug"] | None = Field(
        "auto", description="VOC ground truth for the evaluation (SegmentationClass / ...Aug); None = no evaluation.")
    cls_labels: str | None = Field(None, description="psa's cls_labels.npy for the image-level labels (trusted file).")
    dataset_options: dict[str, Any] = Field(default_factory=dict, description="Extra open_dataset options.")
    images: int = Field(64, gt=0, description="Synthetic set: images.")
    size: int = Field(64, ge=16, description="Synthetic set: image side (pixels).")
    num_classes: int = Field(3, ge=1, le=8, description="Synthetic set: object classes.")
    max_objects: int = Field(3, ge=1, description="Synthetic set: objects per image (1..max_objects).")
    seed: int = Field(0, description="Seed of the data, the initialisations and the training.")
    # classifier
    classifier: str | None = Field(None, description="A trained classifier file (skips training).")
    vit: str = Field("vit_tiny_patch16_224", description="timm ViT of the classifier (preset).")
    vit_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra timm.create_model arguments (preset).")
    weights: str | None = Field(None, description="Local ImageNet-pretrained weights of the ViT.")
    image_size: int | None = Field(None, ge=16, description="Classifier input side (preset; None = synthetic size).")
    cls_epochs: int = Field(30, gt=0, description="Classifier epochs (preset).")
    cls_lr: float = Field(1e-3, gt=0, description="Classifier learning rate (preset).")
    cls_batch_size: int = Field(16, gt=0, description="Classifier global batch size (preset).")
    cls_optimizer: Literal["sgd", "adamw"] = Field("adamw", description="Classifier optimiser (preset).")
    cls_weight_decay: float = Field(0.05, ge=0, description="Classifier weight decay (preset).")
    cls_schedule: Literal["poly", "cosine"] = Field("cosine", description="Classifier lr schedule (preset).")
    cls_jitter: bool = Field(False, description="Colour jitter of the classifier's images (preset).")
    # seeds
    explainer: str = Field("vit-lrp", description="Registered explainer giving the seeds.")
    explainer_options: dict[str, Any] = Field(
        default_factory=dict, description="Explainer config overrides (vit-lrp: start_layer pinned to 0 unless given).")
    # AffinityNet
    affinity_options: dict[str, Any] = Field(
        default_factory=dict, description="affinitynet config overrides, merged over the preset's (backbone, "
        "backbone_weights, levels, pairs, freeze_bn, walk_preset, crf, ...).")
    aff_epochs: int = Field(8, gt=0, description="AffinityNet epochs (preset).")
    aff_lr: float = Field(0.1, gt=0, description="AffinityNet base learning rate.")
    aff_batch_size: int = Field(8, gt=0, description="AffinityNet global batch size.")
    aff_crop: int | None = Field(None, gt=0, description="AffinityNet random crop (preset; None = whole images).")
    aff_jitter: bool = Field(False, description="Colour jitter of AffinityNet's images (preset).")
    # outputs
    pseudo_ignore: float | None = Field(None, ge=0, le=1, description="Pseudo-mask pixels whose refined "
                                        "probability is below this become 255 (ignore); None = none.")
    crf_eval: bool | None = Field(None, description="Seeds+CRF / refined+CRF rows: True needs pydensecrf2; None = "
                                  "when installed.")
    examples: int = Field(6, ge=0, description="Images in the example figure and the report.")
    device: str | None = Field(None, description="Device; None = cuda:LOCAL_RANK when available, else cpu.")
    workers: int = Field(0, ge=0, description="DataLoader worker processes of the training stages.")
    progress: bool = Field(True, description="Show progress bars.")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        preset = data.get("preset") or ("synthetic" if data.get("dataset") is None else "voc")
        data["preset"] = preset
        for key, value in PRESETS[preset].items():
            if key == "affinity_options":
                given = dict(data.get(key) or {})
                if ("beta" in given or "steps" in given) and "walk_preset" not in given:
                    value = {k: v for k, v in value.items() if k != "walk_preset"}  # explicit beta / t win
                data[key] = {**value, **given}
            elif key not in data:
                data[key] = value
        return data

    @model_validator(mode="after")
    def _check(self):
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues the run in out, overwrite "
                             "deletes it")
        if self.dataset is not None and self.data_root is None:
            raise ValueError(f"dataset={self.dataset!r} needs data_root (the dataset's folder)")
        if self.dataset is None and self.data_root is not None:
            raise ValueError("data_root given without dataset; give dataset='voc' (or another kind)")
        return self


@dataclass
class WSSSResult:
    """What :func:`run_wsss` measured and produced. ``seeds``, ``seed_masks`` and ``pseudo_masks``
    are read from ``out`` on first access (all evaluation images must share one size, e.g. the
    synthetic set); nothing else holds per-image arrays."""

    miou: dict[str, float]
    iou: dict[str, list[float]]
    classes: list[str]
    classifier_accuracy: float
    seed_saliency: dict[str, float]
    timing: dict[str, dict[str, float]]
    examples: np.ndarray | None = field(default=None, repr=False)
    history: dict[str, list] = field(default_factory=dict, repr=False)
    classifier: Any = field(default=None, repr=False)
    refiner: Any = field(default=None, repr=False)
    data: Any = field(default=None, repr=False)
    out: str | None = None
    notes: list[str] = field(default_factory=list)
    _ids: list[str] = field(default_factory=list, repr=False)
    _tmp: Any = field(default=None, repr=False)

    @property
    def seed_miou(self) -> float:
        return self.miou["seeds"]

    @property
    def refined_miou(self) -> float:
        return self.miou["refined"]

    @property
    def seed_iou(self) -> list[float]:
        return self.iou["seeds"]

    @property
    def refined_iou(self) -> list[float]:
        return self.iou["refined"]

    @property
    def folder(self) -> Path:
        return Path(self.out if self.out is not None else self._tmp.name)

    @property
    def seeds(self) -> torch.Tensor:
        """(N, K, H, W) seeds of the evaluation images (zeros for absent classes)."""
        store = SeedStore(self.folder / "seeds")
        return _stack([store.read(i).dense(len(self.classes)) for i in self._ids])

    @property
    def seed_masks(self) -> torch.Tensor:
        return self.masks("seeds")

    @property
    def pseudo_masks(self) -> torch.Tensor:
        return self.masks("refined")

    def masks(self, variant: str) -> torch.Tensor:
        """(N, H, W) int64 label maps of a variant (``seeds``, ``refined``, ...) read from their PNGs."""
        folder = self.folder / "masks" / variant
        return _stack([torch.from_numpy(read_label_png(folder / f"{i}.png").astype(np.int64)) for i in self._ids])

    def summary(self) -> dict[str, Any]:
        names = ["background", *self.classes]
        return {"seed_miou": self.seed_miou, "refined_miou": self.refined_miou, "miou": self.miou,
                "seed_iou": dict(zip(names, self.seed_iou)), "refined_iou": dict(zip(names, self.refined_iou)),
                "iou": {k: dict(zip(names, v)) for k, v in self.iou.items()},
                "classifier_accuracy": self.classifier_accuracy, "seed_saliency": self.seed_saliency,
                "timing": self.timing, "notes": self.notes}


def _stack(items: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in items}
    if len(shapes) > 1:
        raise InputError(f"the images differ in size ({sorted(shapes)[:3]} ...): read them one by one from the "
                         "files in out/ instead")
    return torch.stack(items)


# --- evaluation ----------------------------------------------------------------------------------


class PooledConfusion:
    """A confusion matrix pooled over a dataset: rows = ground truth 0..C-1 (``ignore`` skipped),
    columns = prediction 0..C-1 plus one column for predicted ``ignore`` (no label: a miss)."""

    def __init__(self, num_classes: int, ignore: int = IGNORE) -> None:
        self.c, self.ignore = num_classes, ignore
        self.matrix = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64)

    def add(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        pred, target = torch.as_tensor(pred).reshape(-1).long(), torch.as_tensor(target).reshape(-1).long()
        if pred.shape != target.shape:
            raise InputError(f"confusion: prediction and target sizes differ ({pred.numel()} vs {target.numel()})")
        keep = target != self.ignore
        pred, target = pred[keep], target[keep]
        bad = (target >= self.c) | (target < 0) | (((pred >= self.c) | (pred < 0)) & (pred != self.ignore))
        if bool(bad.any()):
            raise InputError(f"confusion: labels must be 0..{self.c - 1} or {self.ignore}, got "
                             f"{sorted(set(torch.cat([pred[bad], target[bad]]).tolist()))[:5]}")
        pred = torch.where(pred == self.ignore, torch.full_like(pred, self.c), pred)
        self.matrix += torch.bincount(target * (self.c + 1) + pred, minlength=self.c * (self.c + 1)).reshape(
            self.c, self.c + 1)

    def iou(self) -> tuple[float, list[float]]:
        """(mIoU over classes with a non-empty union, per-class IoU with NaN for empty unions)."""
        cm = self.matrix.double()
        tp = cm.diagonal()
        union = cm.sum(1) + cm[:, : self.c].sum(0) - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        return float(iou[union > 0].mean()) if bool((union > 0).any()) else float("nan"), iou.tolist()


def confusion_miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[float, list[float]]:
    """Dataset mIoU from a pooled confusion matrix (VOC convention): IoU_c = TP / (TP + FP + FN),
    averaged over classes with a non-empty union; per-class IoUs (NaN when the union is empty);
    ground-truth 255 is ignored."""
    if pred.shape != target.shape:
        raise InputError(f"confusion_miou: predictions {tuple(pred.shape)} and targets {tuple(target.shape)} differ")
    cm = PooledConfusion(num_classes)
    cm.add(pred, target)
    return cm.iou()


# --- data ----------------------------------------------------------------------------------------


class ImageSet:
    """Images with image-level labels (and ground truth when known), one at a time:
    ``load(i)`` -> (id, uint8 RGB (H, W, 3), float (K,) labels); ``mask(i)`` -> (H, W) int64 or None."""

    def __init__(self, ids: list[str], classes: list[str], loader, name: str, has_masks: bool) -> None:
        self.ids, self.classes, self._loader, self.name, self.has_masks = ids, classes, loader, name, has_masks
        self._index = {id: i for i, id in enumerate(ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def index(self, id: str) -> int:
        return self._index[id]

    def item(self, index: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor | None]:
        return self._loader(index)

    def load(self, index: int) -> tuple[str, np.ndarray, torch.Tensor]:
        rgb, labels, _ = self._loader(index)
        return self.ids[index], rgb, labels

    def mask(self, index: int) -> torch.Tensor | None:
        return self._loader(index)[2]


def synthetic_set(cfg: WSSSConfig) -> tuple[ImageSet, MultiObjectDataset]:
    data = MultiObjectDataset(cfg.images, size=cfg.size, num_classes=cfg.num_classes, max_objects=cfg.max_objects,
                              seed=cfg.seed)
    ids = [f"synthetic_{i:05d}" for i in range(len(data))]
    return ImageSet(ids, list(data.classes), lambda i: (data.rgb[i], data.labels[i], data.masks[i]),
                    "synthetic", True), data


def dataset_set(cfg: WSSSConfig, split: str | None) -> ImageSet:
    """An :class:`ImageSet` over an ``open_dataset`` kind at its stored resolution."""
    from ..data.datasets import open_dataset

    options = {"size": None, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), **cfg.dataset_options}
    kind = cfg.dataset.strip().lower().replace("_", "-")
    if kind == "voc":
        options.setdefault("masks", cfg.masks)
        if cfg.cls_labels:
            options.setdefault("cls_labels", cfg.cls_labels)
        split = split or "train"
    ds = open_dataset(cfg.dataset, cfg.data_root, split, **options)
    classes = list(getattr(ds, "classes", []) or [])
    ids = list(getattr(ds, "ids", [])) or [str(ds[i]["id"]) for i in range(len(ds))]

    def load(i: int):
        item = ds[i]
        if "labels" not in item:
            raise InputError(f"{cfg.dataset} item {item.get('id')!r} has no image-level 'labels' (the weakly-"
                             "supervised pipeline needs a dataset that provides them, e.g. voc)")
        rgb = (item["image"].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        return rgb, item["labels"].float(), item.get("mask")

    first = load(0)
    classes = classes or [f"class_{k}" for k in range(len(first[1]))]
    has_masks = cfg.masks is not None and first[2] is not None  # masks=None: no evaluation
    return ImageSet(ids, classes, load, f"{cfg.dataset} {split}", has_masks)


# --- the stages ----------------------------------------------------------------------------------


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


class StageLog:
    """``out/timing.jsonl``: one record per stage run (seconds, images done, images skipped)."""

    def __init__(self, out: Path, main: bool) -> None:
        self.path, self.main = out / "timing.jsonl", main

    def write(self, stage: str, seconds: float, done: int = 0, skipped: int = 0) -> None:
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps({"stage": stage, "seconds": seconds, "done": done, "skipped": skipped}) + "\n")

    def totals(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                r = json.loads(line)
                t = out.setdefault(r["stage"], {"seconds": 0.0, "done": 0, "skipped": 0})
                for k in ("seconds", "done", "skipped"):
                    t[k] += r[k]
        return out


def _resume_options(cfg: WSSSConfig, folder: Path) -> dict[str, bool]:
    """A resumed pipeline continues a trainer from its last epoch; a trainer folder without a
    checkpoint (killed in its first epoch) starts afresh."""
    if not cfg.resume:
        return {"resume": False, "overwrite": False}
    if (folder / "last.safetensors").exists():
        return {"resume": True, "overwrite": False}
    return {"resume": False, "overwrite": True}


def _logged_epochs(folder: Path) -> int:
    return len(MetricsLog(folder / "log.jsonl").read())


def classifier_stage(cfg: WSSSConfig, train: ImageSet, out: Path) -> tuple[Any, dict, list]:
    """Train (or load) the multi-label ViT; returns (model, info, history)."""
    if cfg.classifier:
        model, info = load_classifier(cfg.classifier, vit=cfg.vit, vit_kwargs=cfg.vit_kwargs, classes=train.classes,
                                      image_size=cfg.image_size or cfg.size)
        return model, info, []
    folder = out / "classifier"
    if cfg.weights is None and cfg.preset != "synthetic" and is_main_process():
        warnings.warn("the classifier starts from random weights; the paper fine-tunes an ImageNet-pretrained ViT: "
                      "pass weights=FILE (--weights)", stacklevel=3)
    trained = train_multilabel(
        train, out=str(folder), vit=cfg.vit, vit_kwargs=cfg.vit_kwargs, weights=cfg.weights,
        image_size=cfg.image_size or cfg.size, epochs=cfg.cls_epochs, lr=cfg.cls_lr, batch_size=cfg.cls_batch_size,
        optimizer=cfg.cls_optimizer, weight_decay=cfg.cls_weight_decay, schedule=cfg.cls_schedule,
        color_jitter=PSA_JITTER if cfg.cls_jitter else None, seed=cfg.seed, device=cfg.device,
        progress=cfg.progress, workers=cfg.workers, **_resume_options(cfg, folder))
    return trained["model"], trained["info"], trained["history"]


def explainer_for(cfg: WSSSConfig):
    options = dict(cfg.explainer_options)
    entry = registry.entry(cfg.explainer)
    if entry.name == "vit-lrp":
        options.setdefault("start_layer", 0)  # Chefer et al.'s generate_LRP default, pinned (see docs/wsss.md)
    return registry.build(cfg.explainer, **options)


@torch.no_grad()
def _logits(model, x: torch.Tensor) -> torch.Tensor:
    return model(x)[0].float().cpu()


def explain_image(model, info: dict, explainer, rgb: np.ndarray, labels: torch.Tensor, device
                  ) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Seeds (K_present, H, W) in [0, 1] of one image at its stored size, the present classes, the logits.
    The batch holds the image once per present class, so the result does not depend on how images
    are grouped (resume, sharding)."""
    size = int(info["image_size"])
    x = to_tensor(resize_rgb(rgb, size), info["mean"], info["std"])[None].to(device)
    logits = _logits(model, x)
    present = torch.nonzero(labels > 0.5)[:, 0].tolist()
    h, w = rgb.shape[:2]
    if not present:
        return torch.zeros(0, h, w), [], logits
    maps = explainer.explain(model, x.expand(len(present), -1, -1, -1), present).float()
    maps = F.interpolate(maps[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    return maps.clamp(0, 1).cpu(), present, logits


def seeds_stage(cfg: WSSSConfig, model, info: dict, sets: list[ImageSet], store: SeedStore, rank: int,
                world: int, device) -> tuple[int, int]:
    """Write the seeds of every image of ``sets`` not yet in ``store`` (this process's shard)."""
    explainer = explainer_for(cfg)
    jobs, seen = [], set()
    for s in sets:
        for i, id in enumerate(s.ids):
            if id not in seen:
                seen.add(id)
                jobs.append((s, i, id))
    mine = shard(jobs, rank, world)
    todo = [j for j in mine if not store.has(j[2])]
    model = model.to(device).eval()
    for s, i, id in tqdm(todo, desc="seeds", disable=not (cfg.progress and rank == 0)):
        _, rgb, labels = s.load(i)
        seeds, present, logits = explain_image(model, info, explainer, rgb, labels, device)
        store.write(id, seeds, present, logits)
    return len(todo), len(mine) - len(todo)


class DiskSeeds:
    """The :class:`~foveal.training.affinity.SeedSource` of the pipeline: images from the set, seeds
    from the store."""

    def __init__(self, images: ImageSet, store: SeedStore) -> None:
        self.images, self.store = images, store

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[str, np.ndarray, torch.Tensor]:
        id, rgb, _ = self.images.load(index)
        return id, rgb, self.store.read(id).seeds


def build_refiner(cfg: WSSSConfig):
    torch.manual_seed(cfg.seed)
    return registry.build("affinitynet", **cfg.affinity_options)


def affinity_stage(cfg: WSSSConfig, train: ImageSet, store: SeedStore, out: Path, device) -> tuple[Any, list]:
    refiner = build_refiner(cfg).to(device)
    trained = train_affinitynet(
        refiner, DiskSeeds(train, store), out=str(out / "affinitynet"), epochs=cfg.aff_epochs, lr=cfg.aff_lr,
        batch_size=cfg.aff_batch_size, crop_size=cfg.aff_crop, color_jitter=PSA_JITTER if cfg.aff_jitter else None,
        seed=cfg.seed, device=cfg.device, progress=cfg.progress, workers=cfg.workers,
        **_resume_options(cfg, out / "affinitynet"))
    return trained["model"], trained["history"]


def walk_variants(crf: bool) -> tuple[str, ...]:
    return VARIANTS if crf else ("seeds", "refined")


@torch.no_grad()
def walk_image(refiner, rgb: np.ndarray, seeds: torch.Tensor, classes: torch.Tensor, crf: bool,
               pseudo_ignore: float | None, device) -> dict[str, np.ndarray]:
    """The label maps (H, W) uint8 of one image: seeds, refined and, with ``crf``, their CRF versions."""
    rc = refiner.config
    lut = np.array([0, *(classes + 1).tolist()], np.uint8)
    seeds = seeds[None].float()
    seed_scores = background_scores(seeds, rc.walk_alpha)[0]
    out = {"seeds": lut[seed_scores.argmax(0).numpy()]}
    if len(classes):
        x = to_tensor(rgb, rc.mean, rc.std)[None].to(device)
        probs = refiner.refine(x, seeds.to(device))[0].cpu()
    else:
        probs = torch.ones(1, *rgb.shape[:2])
    refined = lut[probs.argmax(0).numpy()]
    if pseudo_ignore is not None:
        refined[(probs.amax(0) < pseudo_ignore).numpy()] = IGNORE
    out["refined"] = refined
    if crf:
        out["seeds_crf"] = lut[dense_crf(rgb, seed_scores.double().numpy()).argmax(0)]
        out["refined_crf"] = lut[dense_crf(rgb, probs.double().numpy()).argmax(0)]
    return out


def walk_stage(cfg: WSSSConfig, refiner, images: ImageSet, store: SeedStore, masks: Path, crf: bool, rank: int,
               world: int, device) -> tuple[int, int]:
    variants = walk_variants(crf)
    mine = shard(list(range(len(images))), rank, world)
    todo = [i for i in mine if not all((masks / v / f"{images.ids[i]}.png").exists() for v in variants)]
    refiner = refiner.to(device).eval()
    for i in tqdm(todo, desc="random walk", disable=not (cfg.progress and rank == 0)):
        id, rgb, _ = images.load(i)
        rec = store.read(id)
        for name, label in walk_image(refiner, rgb, rec.seeds, rec.classes, crf, cfg.pseudo_ignore, device).items():
            write_label_png(masks / name / f"{id}.png", label)
    return len(todo), len(mine) - len(todo)


def eval_stage(images: ImageSet, store: SeedStore, masks: Path, crf: bool, progress: bool
               ) -> tuple[dict[str, float], dict[str, list[float]], float]:
    """Pooled-confusion mIoU of every variant and the classifier's per-label accuracy."""
    k = len(images.classes) + 1
    confusions = {v: PooledConfusion(k) for v in walk_variants(crf)}
    correct = total = 0
    for i in tqdm(range(len(images)), desc="evaluation", disable=not progress):
        id, (_, labels, target) = images.ids[i], images.item(i)
        rec = store.read(id)
        correct += int(((rec.logits > 0).float() == labels).sum())
        total += labels.numel()
        if not images.has_masks:
            continue
        if target is None:
            raise InputError(f"{images.name}: item {id!r} has no ground-truth mask to evaluate against")
        for v, cm in confusions.items():
            cm.add(torch.from_numpy(read_label_png(masks / v / f"{id}.png").astype(np.int64)), target)
    miou, iou = {}, {}
    for v, cm in confusions.items():
        miou[v], iou[v] = cm.iou() if images.has_masks else (float("nan"), [float("nan")] * k)
    return miou, iou, correct / max(total, 1)


# --- pictures and the report ---------------------------------------------------------------------


def palette_overlay(rgb: np.ndarray, labels: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """VOC-palette colours of a label map (0 left untouched, 255 in the ignore colour) over an image."""
    out = rgb.astype(np.float32).copy()
    m = labels > 0
    out[m] = (1 - alpha) * out[m] + alpha * VOC_PALETTE[labels[m]].astype(np.float32)
    return out.round().clip(0, 255).astype(np.uint8)


def example_figure(images: ImageSet, store: SeedStore, masks: Path, n: int, crf: bool) -> np.ndarray:
    """Rows of image | ground truth | seed map | seed mask | refined pseudo-mask [| refined + CRF]."""
    rows, cols = [], ["image", "truth", "seed map", "seed mask", "refined"] + (["refined+CRF"] if crf else [])
    for i in range(min(n, len(images))):
        id, (rgb, _, truth) = images.ids[i], images.item(i)
        rec = store.read(id)
        seed_map = rec.seeds.amax(0).numpy() if len(rec.classes) else np.zeros(rgb.shape[:2], np.float32)
        row = [rgb, palette_overlay(rgb, truth.numpy().astype(np.uint8)) if truth is not None else rgb,
               heatmap_overlay(rgb, seed_map)]
        row += [palette_overlay(rgb, read_label_png(masks / v / f"{id}.png"))
                for v in (("seeds", "refined", "refined_crf") if crf else ("seeds", "refined"))]
        rows.append(row)
    return grid(rows, col_labels=cols)


def write_report(path: Path, cfg: WSSSConfig, result: WSSSResult, images: ImageSet) -> Path:
    from ..report import Report, plot_curves

    rep = Report("Weakly-supervised segmentation: ViT explanations refined by AffinityNet",
                 f"{images.name}: {len(images)} images, {len(result.classes)} classes; explainer {cfg.explainer}; "
                 "vit-lrp-affinitynet.txt sections 4.3, 5.3-5.4, Table 4")
    rep.section("mIoU", "Pooled confusion matrix over the dataset (background + classes, ground-truth 255 ignored).")
    rep.table([{"masks": VARIANT_NAMES[v], "mIoU (%)": 100 * m} for v, m in result.miou.items()], digits=2)
    for note in result.notes:
        rep.text(note, "note")
    names = ["background", *result.classes]
    rep.section("Per-class IoU (%)")
    rep.table([{"class": c, **{VARIANT_NAMES[v]: 100 * result.iou[v][j] for v in result.iou}}
               for j, c in enumerate(names)], digits=2)
    if result.examples is not None:
        rep.section("Seeds vs refined pseudo-masks", "Colours: VOC palette; light grey-yellow = 255 (ignore).")
        rep.image(result.examples)
    rep.section("Timing per stage", "Wall-clock seconds summed over the runs that built this folder (a resumed "
                "run adds its own time; skipped images cost nothing).")
    rep.table([{"stage": s, "seconds": t["seconds"], "images": int(t["done"]), "skipped": int(t["skipped"]),
                "s / image": t["seconds"] / t["done"] if t["done"] else float("nan")}
               for s, t in result.timing.items()], digits=3)
    curves = {k: [r["loss"] for r in v] for k, v in result.history.items() if v}
    if curves:
        rep.section("Training loss")
        for name, ys in curves.items():
            rep.image(plot_curves({name: ys}, ylabel="loss", title=name), caption=name)
    rep.section("Settings")
    rep.text(json.dumps(cfg.model_dump(), default=str))
    return rep.write(path)


# --- the pipeline --------------------------------------------------------------------------------


def _check_out(cfg: WSSSConfig, out: Path, main: bool, world: int) -> None:
    """A fresh run needs a folder without a run in it; a resumed one the same settings."""
    path = out / "config.json"
    mine = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RUN_ONLY}
    exists = path.exists()
    _barrier(world)  # every process looks before rank 0 writes
    if cfg.overwrite:  # also a folder of an older foveal without config.json: the run's own names only
        if main:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
            for name in RUN_FOLDERS:
                shutil.rmtree(out / name, ignore_errors=True)
        exists = False
        _barrier(world)
    if exists:
        if not cfg.resume:
            raise InputError(f"{out} already holds a WSSS run ({path}): pass resume=True (--resume) to continue it, "
                             "overwrite=True (--overwrite) to delete it and start afresh, or choose another folder")
        saved = {k: v for k, v in json.loads(path.read_text()).items() if k not in RUN_ONLY}
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if diff:
            raise InputError(f"cannot resume {out}: settings differ from the saved run in "
                             + ", ".join(f"{k} (saved {saved.get(k)!r}, now {mine.get(k)!r})" for k in diff[:5]))
    elif main:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
        os.replace(tmp, path)
    _barrier(world)


def run_wsss(config: WSSSConfig | dict | None = None, **overrides: Any) -> WSSSResult | None:
    """Run the pipeline of the module docstring; returns a :class:`WSSSResult` (None on torchrun
    processes other than rank 0, and when ``stop_after`` ends the run before the evaluation)."""
    values = config.model_dump(exclude_unset=True) if isinstance(config, WSSSConfig) else dict(config or {})
    cfg = WSSSConfig(**{**values, **overrides})
    rank, world = init_distributed(device=cfg.device)
    main = rank == 0
    device = training_device(cfg.device)
    crf = crf_available() if cfg.crf_eval is None else cfg.crf_eval
    if cfg.crf_eval:
        require_crf()
    tmp = None
    if cfg.out is None:
        if world > 1:
            raise InputError("under torchrun give out=... (a folder every process can reach)")
        tmp = tempfile.TemporaryDirectory()
    out = Path(cfg.out or tmp.name)
    _check_out(cfg, out, main, world)
    stages = StageLog(out, main)
    seed_everything(cfg.seed)

    data = None
    if cfg.dataset is None:
        train, data = synthetic_set(cfg)
        evaluation = train
    else:
        train = dataset_set(cfg, cfg.split)
        evaluation = train if cfg.eval_split in (None, cfg.split) else dataset_set(cfg, cfg.eval_split)
        if evaluation.classes != train.classes:
            raise InputError(f"the evaluation split has classes {evaluation.classes}, training {train.classes}")
    store, masks = SeedStore(out / "seeds"), out / "masks"

    t0, before = time.time(), _logged_epochs(out / "classifier")
    classifier, info, cls_history = classifier_stage(cfg, train, out)
    stages.write("classifier", time.time() - t0, done=(len(cls_history) - before) * len(train))
    _barrier(world)
    if cfg.stop_after == "classifier":
        return None

    t0 = time.time()
    done, skipped = seeds_stage(cfg, classifier, info, [train, evaluation], store, rank, world, device)
    _reduce_log(stages, "seeds", time.time() - t0, done, skipped, world)
    if cfg.stop_after == "seeds":
        return None

    t0, before = time.time(), _logged_epochs(out / "affinitynet")
    refiner, aff_history = affinity_stage(cfg, train, store, out, device)
    stages.write("affinity", time.time() - t0, done=(len(aff_history) - before) * len(train))
    _barrier(world)
    if cfg.stop_after == "affinity":
        return None

    t0 = time.time()
    done, skipped = walk_stage(cfg, refiner, evaluation, store, masks, crf, rank, world, device)
    _reduce_log(stages, "walk", time.time() - t0, done, skipped, world)
    if cfg.stop_after == "walk" or not main:
        return None

    t0 = time.time()
    miou, iou, accuracy = eval_stage(evaluation, store, masks, crf, cfg.progress)
    notes = []
    if not crf:
        notes.append("seeds + CRF and refined + CRF turned off (crf_eval=False)" if cfg.crf_eval is False else
                     "seeds + CRF and refined + CRF skipped: the dense CRF needs the optional extra "
                     "(pip install 'foveal[crf]', i.e. pydensecrf2)")
    if not evaluation.has_masks:
        notes.append("no ground-truth masks (masks=None): mIoU not computed")
    saliency = seed_saliency(store, evaluation) if data is not None else {}
    examples = example_figure(evaluation, store, masks, cfg.examples, crf) if cfg.examples else None
    stages.write("eval", time.time() - t0, done=len(evaluation))
    result = WSSSResult(
        miou=miou, iou=iou, classes=list(train.classes), classifier_accuracy=accuracy, seed_saliency=saliency,
        timing=stages.totals(), examples=examples, history={"classifier": cls_history, "affinitynet": aff_history},
        classifier=classifier, refiner=refiner, data=data, out=cfg.out, notes=notes, _ids=list(evaluation.ids),
        _tmp=tmp)
    (out / "result.json").write_text(json.dumps(result.summary(), indent=2, default=float))
    if examples is not None:
        save_image(examples, out / "examples.png")
    write_report(out / "report.html", cfg, result, evaluation)
    return result


def _reduce_log(stages: StageLog, name: str, seconds: float, done: int, skipped: int, world: int) -> None:
    """Log a sharded stage once: the slowest process's time, every process's images."""
    if world > 1:
        slowest = torch.tensor([seconds], dtype=torch.float64)
        counts = torch.tensor([done, skipped], dtype=torch.int64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        dist.all_reduce(counts)
        seconds, done, skipped = float(slowest[0]), int(counts[0]), int(counts[1])
    stages.write(name, seconds, done, skipped)
    _barrier(world)


def seed_saliency(store: SeedStore, images: ImageSet) -> dict[str, float]:
    """Class-agnostic seed maps scored with ``saliency-segmentation`` (Table 3's pixel accuracy /
    mAP / mIoU), for a small in-memory set (the synthetic one)."""
    if not registry.has("saliency-segmentation"):
        return {}
    k = len(images.classes)
    maps = torch.stack([store.read(id).dense(k).amax(0) for id in images.ids])
    fg = torch.stack([images.mask(i) for i in range(len(images))]) > 0
    return {q: float(registry.build("saliency-segmentation", quantity=q).score(maps, fg))
            for q in ("pixel-accuracy", "ap", "miou")}
