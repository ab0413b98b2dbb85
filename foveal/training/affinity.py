"""Training AffinityNet on affinity labels derived from explanation seeds.

Settings follow ``vit-lrp-affinitynet.txt`` section 5.4 (SGD, lr 0.1, batch 8, weight decay 1e-4,
7 epochs, flips and colour jitter) and, where it is silent, the authors' ``psa/train_aff.py``:

* **Optimiser** (psa ``torchutils.PolyOptimizer``): SGD with polynomial decay ``(1 - step /
  max_step)^0.9`` over all steps; psa's four parameter groups (:meth:`AffinityNet.parameter_groups`):
  backbone weights (lr, decay), biases (2x lr, no decay), new layers (10x lr), their biases (20x,
  no decay). psa's ``PolyOptimizer`` passes its weight decay positionally into SGD's momentum slot
  (5e-4 "momentum"), a no-op we write as ``momentum=0``; the per-group decay is what regularises.
* **Data** (:class:`AffinityDataset`, psa ``voc12/data.py`` ``VOC12AffDataset``): per image the
  alpha_low / alpha_high score maps at full resolution (optionally dense-CRF refined, cached on
  disk as psa precomputes ``la_crf_dir`` / ``ha_crf_dir``), then colour jitter of the image
  (``ColorJitter(0.3, 0.3, 0.3, 0.1)``), psa's random crop (``crop_size`` 448; zero padding, whose
  missing scores become ignored positions) and a random horizontal flip of image and scores
  together, then the scores are area-pooled to the feature grid (psa ``AvgPool2d(8)``) and turned
  into the label map (:func:`foveal.refine.seeds.labels_from_scores`). The paper says VOC images
  were "resized to 448x448"; psa crops 448 without resizing, which we follow (``crop_size=None``
  keeps whole images, which must then share one size).
* **Frozen layers**: BatchNorm and the early layers (:class:`AffinityNet` ``freeze_bn`` /
  ``freeze_levels``) never change.
* **Batches**: ``batch_size`` is global. Under ``torchrun`` the model is wrapped in
  ``DistributedDataParallel`` and each of the ``W`` processes takes ``batch_size / W`` items of the
  same global batches (a ``DistributedSampler`` over one permutation per epoch, psa's
  ``drop_last``); the pair counts that normalise the loss are summed over the processes, so the
  averaged gradients equal one process holding the whole batch (psa ran ``DataParallel``).

The epochs run in the shared skeleton :class:`~foveal.core.training.TrainingRun`: every epoch
writes ``<out>/last.safetensors`` (model, optimizer, scheduler, epoch, RNG states, the refiner's
config) and ``<out>/affinitynet.safetensors`` (the refiner as a foveal component,
``foveal.load``-able), and one JSON line to ``<out>/log.jsonl``; ``resume=True`` continues exactly
where the last completed epoch ended (the order comes from the epoch and every item's augmentation
from ``(seed, epoch, index)``); a folder holding a run is refused without ``resume`` or
``overwrite``. The trainer supplies :func:`build_optimizer`, :func:`make_loader` and :func:`train_step`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..core.errors import InputError
from ..core.training import TrainingRun, seed_everything
from ..data.images import to_tensor, to_uint8
from ..models.affinitynet import AffinityNet, affinity_loss, check_seeds, pair_labels
from ..refine.seeds import label_scores, labels_from_scores
from ..refine.store import atomic_savez
from ..registry.checkpoints import checkpoint_config, save
from .augment import PSA_JITTER, color_jitter, crop_box, crop_into, fit_batch


class AffinityTrainConfig(BaseModel):
    """Settings of :func:`train_affinitynet` (defaults: paper section 5.4, else psa ``train_aff.py``)."""

    model_config = ConfigDict(extra="forbid")

    out: str = Field(description="Output folder (checkpoints, log.jsonl).")
    epochs: int = Field(8, gt=0, description="Epochs (psa 8, the replication 7).")
    batch_size: int = Field(8, gt=0, description="Global batch size (split over torchrun processes).")
    lr: float = Field(0.1, gt=0, description="Base learning rate of the backbone weights.")
    head_lr_mult: float = Field(10.0, gt=0, description="Learning-rate factor of the new affinity layers (psa 10).")
    bias_lr_mult: float = Field(2.0, gt=0, description="Learning-rate factor of biases (psa 2; no weight decay).")
    weight_decay: float = Field(1e-4, ge=0, description="SGD weight decay of the weights (paper 1e-4; psa 5e-4).")
    momentum: float = Field(0.0, ge=0, description="SGD momentum (psa: none, see the module docstring).")
    poly_power: float = Field(0.9, ge=0, description="Polynomial learning-rate decay power over all steps.")
    crop_size: int | None = Field(None, gt=0, description="psa random crop side (448 in psa); None = whole images.")
    flip: bool = Field(True, description="Random horizontal flips of image and scores.")
    color_jitter: tuple[float, float, float, float] | None = Field(
        PSA_JITTER, description="ColorJitter (brightness, contrast, saturation, hue) of the image (psa, paper "
        "5.4); None = off.")
    crf_cache: str | None = Field(None, description="Folder caching the CRF-refined label scores (crf=True); "
                                  "None = <out>/crf_scores.")
    workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    seed: int = Field(0, description="Seed of shuffling and augmentation.")
    device: str | None = Field(None, description="Device; None = cuda:LOCAL_RANK when available, else cpu.")
    resume: bool = Field(False, description="Continue from <out>/last.safetensors if it exists.")
    overwrite: bool = Field(False, description="Delete the run in <out> (checkpoints, log.jsonl) and start afresh.")
    progress: bool = Field(True, description="Show a tqdm progress bar (main process).")


# --- data ----------------------------------------------------------------------------------------


class SeedSource(Protocol):
    """Images with their seeds, one at a time: ``load(i)`` -> (id, uint8 RGB (H, W, 3), seeds
    float (K, H, W) in [0, 1] of the classes present)."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[str, np.ndarray, torch.Tensor]: ...


class TensorSeedSource:
    """A :class:`SeedSource` over in-memory tensors: normalised images (N, 3, H, W) and seeds
    (N, K, H, W) (``mean``/``std`` undo the normalisation for the colour jitter)."""

    def __init__(self, images: torch.Tensor, seeds: torch.Tensor, mean, std) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise InputError(f"images: expected a (N, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
        self.seeds = check_seeds(seeds, images).float().cpu()
        self.rgb = to_uint8(images, mean, std)

    def __len__(self) -> int:
        return len(self.rgb)

    def load(self, index: int) -> tuple[str, np.ndarray, torch.Tensor]:
        return str(index), self.rgb[index], self.seeds[index]


class AffinityDataset(Dataset):
    """Training items ``(image (3, S, S), label map (h, w) int64)`` of AffinityNet, augmented as the
    module docstring says; call :meth:`set_epoch` before each epoch (like a DistributedSampler)."""

    def __init__(self, source: SeedSource, refiner: AffinityNet, label_size: tuple[int, int],
                 config: AffinityTrainConfig) -> None:
        rc = refiner.config
        self.source, self.label_size, self.cfg = source, tuple(label_size), config
        self.alphas = (rc.alpha_low, rc.alpha_high)
        self.crf, self.mean, self.std = rc.crf, rc.mean, rc.std
        self.cache = Path(config.crf_cache or Path(config.out) / "crf_scores") if rc.crf else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def scores(self, id: str, rgb: np.ndarray, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The alpha_low / alpha_high scores (K + 1, H, W) at full resolution (CRF ones cached)."""
        if self.cache is not None:
            path = self.cache / f"{id}.npz"
            if path.exists():
                with np.load(path) as f:
                    return torch.from_numpy(f["low"].astype(np.float32)), torch.from_numpy(f["high"].astype(np.float32))
        low, high = label_scores(seeds[None], alpha_low=self.alphas[0], alpha_high=self.alphas[1], crf=self.crf,
                                 images=rgb[None] if self.crf else None)
        low, high = low[0], high[0]
        if self.cache is not None:  # keep exactly what a later epoch or a resumed run reads back
            low16, high16 = low.numpy().astype(np.float16), high.numpy().astype(np.float16)
            atomic_savez(self.cache / f"{id}.npz", low=low16, high=high16)
            low, high = torch.from_numpy(low16.astype(np.float32)), torch.from_numpy(high16.astype(np.float32))
        return low, high

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        id, rgb, seeds = self.source.load(index)
        low, high = self.scores(id, rgb, torch.as_tensor(seeds, dtype=torch.float32))
        # separate streams: turning the jitter off leaves the crops and flips as they were
        rng = np.random.default_rng([cfg.seed, self.epoch, index, 0])
        if cfg.color_jitter is not None:
            jitter_seed = int(np.random.default_rng([cfg.seed, self.epoch, index, 1]).integers(2**62))
            rgb = color_jitter(rgb, torch.Generator().manual_seed(jitter_seed), cfg.color_jitter)
        image = to_tensor(rgb, self.mean, self.std)
        scores = torch.cat([low, high])
        if cfg.crop_size is not None:
            box = crop_box(tuple(image.shape[-2:]), cfg.crop_size, rng)
            image, scores = crop_into(image, cfg.crop_size, box), crop_into(scores, cfg.crop_size, box)
        if cfg.flip and bool(rng.integers(2)):
            image, scores = image.flip(-1), scores.flip(-1)
        low, high = scores.split(len(low))
        label = labels_from_scores(low[None], high[None], self.label_size)[0]
        return image, label


# --- optimisation --------------------------------------------------------------------------------


def build_optimizer(refiner: AffinityNet, cfg: AffinityTrainConfig, total_steps: int
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD over psa's parameter groups with the polynomial decay of psa's ``PolyOptimizer``."""
    groups = refiner.parameter_groups(cfg.lr, cfg.weight_decay, cfg.head_lr_mult, cfg.bias_lr_mult)
    optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (1 - min(step, total_steps - 1) / total_steps) ** cfg.poly_power)
    return optimizer, scheduler


def make_loader(dataset: AffinityDataset, cfg: AffinityTrainConfig, epoch: int, rank: int, world: int) -> DataLoader:
    """This process's share of the epoch's global batches (see the module docstring)."""
    dataset.set_epoch(epoch)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=cfg.batch_size // world, sampler=sampler, drop_last=True,
                      num_workers=cfg.workers)


def train_step(net: nn.Module, refiner: AffinityNet, images: torch.Tensor, labels: torch.Tensor, world: int
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one (local) batch with pair counts of the global batch (module docstring)."""
    aff = net(images)
    if tuple(labels.shape) != (aff.shape[0], *aff.shape[-2:]):
        raise InputError(f"label maps {tuple(labels.shape)} do not match the affinity grid {tuple(aff.shape[-2:])}")
    pos_bg, pos_fg, neg = pair_labels(labels, refiner.config.radius, refiner.config.pairs)
    counts = torch.stack([pos_bg.sum(), pos_fg.sum(), neg.sum()]).double()
    if world > 1:
        dist.all_reduce(counts)
    return affinity_loss(aff, pos_bg, pos_fg, neg, counts=counts / world)


def random_frozen_warning(refiner: AffinityNet) -> list[str]:
    """The warning of a run that freezes layers of a randomly initialised backbone (or none)."""
    rc = refiner.config
    if (rc.freeze_bn or rc.freeze_levels) and not rc.backbone_weights:
        return ["affinitynet: BatchNorm / early layers are frozen as in psa, which fine-tunes an ImageNet-pretrained "
                "backbone, but no backbone_weights were given, so the frozen layers keep their random initialisation; "
                "pass backbone_weights=FILE, or freeze_bn=False and freeze_levels=0 to train them"]
    return []


# --- the loop ------------------------------------------------------------------------------------


def train_affinitynet(
    refiner: AffinityNet, data: torch.Tensor | SeedSource, seeds: torch.Tensor | None = None, *,
    config: AffinityTrainConfig | dict | None = None, **overrides: Any,
) -> dict[str, Any]:
    """Train ``refiner`` in place on ``data``: normalised images (N, 3, H, W) with ``seeds``
    (N, K, H, W) in [0, 1], or a :class:`SeedSource` (the pipeline's disk-backed seeds). Returns
    ``{"model", "history", "checkpoint", "model_path"}``; ``history`` holds the JSONL records."""
    values = config.model_dump() if isinstance(config, AffinityTrainConfig) else dict(config or {})
    cfg = AffinityTrainConfig(**{**values, **overrides})
    if not isinstance(refiner, AffinityNet):
        raise InputError(f"train_affinitynet: expected an AffinityNet, got {type(refiner).__name__}")
    if isinstance(data, torch.Tensor):
        if seeds is None:
            raise InputError("train_affinitynet: images given as a tensor need seeds (N, K, H, W)")
        data = TensorSeedSource(data, seeds, refiner.config.mean, refiner.config.std)
    run = TrainingRun(cfg.out, epochs=cfg.epochs, resume=cfg.resume, overwrite=cfg.overwrite,
                      device=cfg.device or next(refiner.parameters()).device, log_name="log.jsonl",
                      outputs=("affinitynet.safetensors",), progress=cfg.progress, desc="affinitynet")
    if cfg.batch_size % run.world:
        raise InputError(f"batch_size {cfg.batch_size} must be divisible by the {run.world} processes")
    if len(data) < cfg.batch_size:
        cfg = cfg.model_copy(update={"batch_size": fit_batch(data, cfg.batch_size, run.world, "train_affinitynet")})
    device = run.device
    refiner.to(device)
    side = (cfg.crop_size, cfg.crop_size) if cfg.crop_size is not None else tuple(data.load(0)[1].shape[:2])
    dataset = AffinityDataset(data, refiner, refiner.feature_size(torch.zeros(1, 3, *side, device=device)), cfg)
    seed_everything(cfg.seed)
    optimizer, scheduler = build_optimizer(refiner, cfg, len(data) // cfg.batch_size * cfg.epochs)
    run.start(refiner, optimizer, scheduler,
              identity={"model": refiner.registry_name or "affinitynet", "model_config": checkpoint_config(refiner)})
    net = run.wrap(refiner)
    model_path = run.out / "affinitynet.safetensors"

    def batches(epoch: int) -> DataLoader:
        net.train()
        return make_loader(dataset, cfg, epoch, run.rank, run.world)

    def step(batch) -> dict[str, Any]:
        images, labels = (t.to(device) for t in batch)
        loss, parts = train_step(net, refiner, images, labels, run.world)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # each process's loss is (processes x its share) of the global batch's: the skeleton's mean over
        # every process's steps is the mean global-batch loss
        return {"loss": loss.detach().double(), **parts}

    history = run.fit(batches, step, export=lambda: save(refiner, model_path), scheduler_interval="step",
                      warnings=random_frozen_warning(refiner))
    refiner.eval()
    return {"model": refiner, "history": history, "checkpoint": run.last, "model_path": model_path}
