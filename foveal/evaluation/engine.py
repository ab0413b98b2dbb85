"""The evaluation loop: explainers x metrics over a stream of batches.

:func:`evaluate` reads a dataset through a ``DataLoader`` (workers optional), explains every image
with every explainer, scores each map with every metric and keeps one record per (image, explainer,
explained class). With ``out`` the records are appended to JSON-lines files after every batch
(flushed and fsynced; see :mod:`foveal.evaluation.records`), so an interrupted run resumes where it
stopped; under ``torchrun`` every process takes its share of the batches and rank 0 merges.

Decisions that hold for every run:

* **Batches on a fixed grid.** Batch k is always dataset indices ``[k*B, (k+1)*B)``; with N
  processes, process r takes batches r, r+N, r+2N, ... (no image twice, none padded), and a resumed
  run skips the finished images of each batch. A batch therefore holds the same images in a
  1-process, an N-process and a resumed run, so results are identical bit for bit (batched kernels
  can round differently when the batch composition changes).
* **Randomness per batch.** Before each batch the torch generator is seeded with ``seed`` and the
  batch number (inside ``torch.random.fork_rng``, so the caller's generator is untouched): random
  explainers (SmoothGrad-CAM++) give the same maps however the run is split or resumed.
* **Targets.** ``"label"``: the item's class; an item without a single label but with multi-hot
  ``labels`` (VOC) is explained once per present class (one row each). ``"predicted"``: the argmax
  of the model's output on the unmodified image (one forward without gradients per batch); for a
  segmentation output the explainers' and metrics' own default (the predicted region). An int:
  that class. A callable (in-memory use, e.g. :class:`~foveal.core.explainer.SegmentationTarget`)
  is passed to the explainers unchanged; the metrics then use their own default. Several
  settings (``targets=("predicted", "label")``, Chefer et al.'s Table 2) evaluate every explainer
  under each, as entries ``"name [setting]"``.
* **Metric targets.** ``metric_targets=None`` scores the class that was explained; ``"label"``,
  ``"predicted"`` or an int score that class instead (Chefer et al.'s perturbation test counts a
  perturbed image as correct when it is classified as the ground-truth class, whichever class
  was explained).
* **Masks.** Localisation and segmentation metrics compare the map with the item's ``mask``: for a
  dataset with multi-hot ``labels`` (VOC) the pixels of the explained class (``mask == class + 1``),
  otherwise every object pixel (``mask`` not 0 and not 255).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ..core.errors import InputError
from ..core.explainer import Explainer
from ..core.metric import Metric, PooledMetric
from ..data.items import close_matches, collate
from .items import ItemView, as_dataset, dataset_identity
from .records import MemoryStore, RecordStore, json_number
from .results import EvaluationResult, summarize

IGNORE = 255
MASK_FAMILIES = ("localisation", "segmentation")
FAMILIES = ("explanation", *MASK_FAMILIES)


@dataclass(frozen=True)
class TargetSetting:
    """Which class an explainer explains (or a metric scores): ``kind`` is ``"label"``,
    ``"predicted"``, ``"class"`` (``value`` the index) or ``"custom"`` (``value`` passed through)."""

    name: str
    kind: str
    value: Any = None


def target_setting(t: Any, what: str = "targets") -> TargetSetting:
    if t is None or (isinstance(t, str) and t.strip().lower() == "predicted"):
        return TargetSetting("predicted", "predicted")
    if isinstance(t, str):
        word = t.strip().lower()
        if word == "label":
            return TargetSetting("label", "label")
        try:
            t = int(word)
        except ValueError:
            raise InputError(f"{what}: expected 'label', 'predicted' or a class index, got {t!r}"
                             f"{close_matches(word, ['label', 'predicted'])}") from None
    if isinstance(t, bool):
        raise InputError(f"{what}: expected 'label', 'predicted' or a class index, got {t!r}")
    if isinstance(t, int):
        if t < 0:
            raise InputError(f"{what}: a class index must be >= 0, got {t}")
        return TargetSetting(f"class {t}", "class", t)
    if callable(t):
        return TargetSetting(getattr(t, "__name__", type(t).__name__), "custom", t)
    raise InputError(f"{what}: expected 'label', 'predicted', a class index or a callable, got {type(t).__name__}")


def target_settings(targets: Any) -> list[TargetSetting]:
    items = list(targets) if isinstance(targets, (list, tuple)) else [targets]
    if not items:
        raise InputError("targets: expected at least one setting")
    settings = [target_setting(t) for t in items]
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise InputError(f"targets: the same setting twice in {names}")
    return settings


def named_components(components: Any, kind: str) -> dict[str, Any]:
    """``{name: component}`` from a mapping, or a sequence of components / ``NAME[:k=v]`` specs
    (named by their spec or registry name)."""
    from ..cli.options import build_component

    base = Explainer if kind == "explainer" else Metric
    if isinstance(components, Mapping):
        out = dict(components)
    else:
        if isinstance(components, (str, base)):
            components = [components]
        out = {}
        for c in components:
            obj = build_component(c, kind) if isinstance(c, str) else c
            name = c if isinstance(c, str) else getattr(obj, "registry_name", type(obj).__name__)
            if name in out:
                raise InputError(f"{kind}s: {name!r} given twice; pass a dict to name them apart")
            out[name] = obj
    if not out:
        raise InputError(f"expected at least one {kind}")
    for name, obj in out.items():
        if not isinstance(obj, base):
            raise InputError(f"{kind} {name!r}: expected a {base.__name__}, got {type(obj).__name__}")
        if kind == "metric" and obj.family not in FAMILIES:
            raise InputError(f"metric {name!r} has family {obj.family!r}; the evaluation knows {', '.join(FAMILIES)}")
    return out


def model_fingerprint(model: nn.Module, weights: bool = True) -> dict:
    """Class, parameter count and (``weights``) a BLAKE2b hash of every state tensor's name, shape,
    dtype and bytes (read on the CPU: the same weights give the same hash on any device)."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    count = 0
    for name, t in model.state_dict().items():
        count += t.numel()
        if weights:
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype};".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"class": type(model).__name__, "numel": count, **({"blake2b": h.hexdigest()} if weights else {})}


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_first_item(item: dict, settings: list[TargetSetting], metric_setting: TargetSetting | None,
                      metrics: dict[str, Metric], dataset: Any) -> None:
    wants_label = any(s.kind == "label" for s in settings) or (metric_setting and metric_setting.kind == "label")
    if wants_label and item["label"] < 0 and "labels" not in item:
        raise InputError(f"targets 'label': the dataset's items have no class label ({type(dataset).__name__} item "
                         f"{item['id']!r} has label -1): use targets 'predicted' or a class index, or a dataset "
                         "with labels (imagenet, voc)")
    needs_masks = [name for name, m in metrics.items() if m.family in MASK_FAMILIES]
    if needs_masks and "mask" not in item:
        raise InputError(f"metric(s) {', '.join(needs_masks)} compare maps with ground-truth masks, but the items "
                         f"of {type(dataset).__name__} have no 'mask': use a dataset with masks (imagenet-seg, voc, "
                         "polyp, a folder with --masks) or, for ImageNet val, its bounding boxes "
                         "(--boxes LOC_val_solution.csv)")


def check_normalization(metrics: dict[str, Metric], mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    """A metric that removes pixels to black needs the inputs' normalisation: refuse a mismatch."""
    if mean is None or std is None:
        return
    for name, m in metrics.items():
        cfg = getattr(m, "config", None)
        if getattr(cfg, "baseline", None) != "black" or not hasattr(cfg, "mean"):
            continue
        same = all(abs(a - b) < 1e-6 for a, b in zip(tuple(cfg.mean) + tuple(cfg.std), tuple(mean) + tuple(std)))
        if not same or len(cfg.mean) != len(mean):
            raise InputError(f"metric {name!r} sets removed pixels to black assuming mean={tuple(cfg.mean)}, "
                             f"std={tuple(cfg.std)}, but the images are normalised with mean={tuple(mean)}, "
                             f"std={tuple(std)}: build it with mean=..., std=... of the data")


class _Batch:
    """One collated batch on the device, with the lazily computed predicted classes."""

    def __init__(self, batch: dict, model: nn.Module, device: torch.device) -> None:
        self.data = batch
        self.model = model
        self.images = batch["image"].to(device, non_blocking=True)
        self.ids: list[str] = batch["id"]
        self.indices = [int(i) for i in batch["index"]]
        self.labels = [int(v) for v in batch["label"]]
        self._predicted: list[int | None] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def predicted(self) -> list[int | None]:
        if self._predicted is None:
            with torch.no_grad():
                out = self.model(self.images)
            self._predicted = out.argmax(1).tolist() if out.dim() == 2 else [None] * len(self)
        return self._predicted

    def rows(self, setting: TargetSetting) -> tuple[list[int], list[int | None]]:
        """(image of each row, class of each row) under ``setting``."""
        b = len(self)
        if setting.kind == "label":
            multi = self.data.get("labels")
            images, classes = [], []
            for i in range(b):
                if self.labels[i] >= 0:
                    images.append(i)
                    classes.append(self.labels[i])
                elif multi is not None and bool((multi[i] > 0.5).any()):
                    present = torch.nonzero(multi[i] > 0.5).flatten().tolist()
                    images += [i] * len(present)
                    classes += present
                else:
                    raise InputError(f"targets 'label': item {self.ids[i]!r} has no class label (label -1"
                                     f"{', no positive labels' if multi is not None else ''}): use targets 'predicted' "
                                     "or a class index")
            return images, classes
        if setting.kind == "predicted":
            return list(range(b)), self.predicted()
        if setting.kind == "class":
            return list(range(b)), [setting.value] * b
        return list(range(b)), [None] * b

    def metric_classes(self, setting: TargetSetting, images: list[int], classes: list[int | None],
                       explained: TargetSetting) -> list[int | None]:
        if setting.kind == "label":
            if explained.kind == "label":
                return classes
            missing = [self.ids[i] for i in images if self.labels[i] < 0]
            if missing:
                raise InputError(f"metric_targets 'label': item {missing[0]!r} has no single class label")
            return [self.labels[i] for i in images]
        if setting.kind == "predicted":
            pred = self.predicted()
            return [pred[i] for i in images]
        return [setting.value] * len(images)

    def masks(self, images: list[int], classes: list[int | None]) -> torch.Tensor:
        m = self.data["mask"][images].to(self.images.device, non_blocking=True)
        if "labels" in self.data:
            cls = torch.tensor([-1 if c is None else c for c in classes], device=m.device)
            by_class = m == (cls + 1)[:, None, None]
            objects = (m != 0) & (m != IGNORE)
            return torch.where((cls >= 0)[:, None, None], by_class, objects)
        return (m != 0) & (m != IGNORE)


def _as_targets(classes: list[int | None], setting: TargetSetting, device: torch.device) -> Any:
    if all(c is None for c in classes):
        return setting.value if setting.kind == "custom" else None
    return torch.tensor(classes, dtype=torch.long, device=device)


def evaluate(
    model: nn.Module,
    dataset: Any,
    explainers: Any,
    metrics: Any,
    *,
    targets: Any = "label",
    metric_targets: Any = None,
    out: str | os.PathLike | None = None,
    batch_size: int = 16,
    workers: int = 0,
    limit: int | None = None,
    overwrite: bool = False,
    keep_maps: int = 0,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    progress: bool = True,
    identity: Mapping[str, Any] | None = None,
) -> EvaluationResult:
    """Explain every image of ``dataset`` with every explainer and score the maps with every metric.

    ``model``: an ``nn.Module`` on the device to use (the images follow it); left in the mode it
    was in. ``dataset``: a dataset of :mod:`foveal.data` (``open_dataset``), any dataset of dicts or
    ``(image, label)`` tuples, an images tensor (N, C, H, W), or a dict of tensors (``image``,
    ``mask``, ``label``, ``labels``, ``id``). ``explainers`` / ``metrics``: ``{name: component}`` or a
    list of components / ``NAME[:k=v]`` specs. ``targets`` / ``metric_targets``: see the module
    docstring. ``out``: output folder for the records (resumed unless ``overwrite``; required under
    torchrun); None keeps everything in memory. ``batch_size``, ``workers``: the DataLoader's.
    ``limit``: the first N images only. ``keep_maps``: return the maps (and images) of the first
    ``keep_maps`` images, one map per explainer (the first explained class), for figures.
    ``resamples``, ``confidence``, ``seed``: the bootstrap intervals (:mod:`foveal.evaluation.results`;
    ``seed`` also seeds random explainers per batch).
    ``identity``: extra entries for the configuration hash (the CLI stores the command's options).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise InputError(f"batch_size: expected a positive integer, got {batch_size}")
    if workers < 0:
        raise InputError(f"workers: expected >= 0, got {workers}")
    explainers = named_components(explainers, "explainer")
    metrics = named_components(metrics, "metric")
    settings = target_settings(targets)
    metric_setting = None if metric_targets is None else target_setting(metric_targets, "metric_targets")
    base = as_dataset(dataset)
    items = ItemView(base)
    n = len(items) if limit is None else min(int(limit), len(items))
    if n < 1:
        raise InputError(f"the dataset has no images to evaluate (size {len(items)}, limit {limit})")
    first = items[0]
    _check_first_item(first, settings, metric_setting, metrics, base)
    transform = getattr(base, "transform", None)
    check_normalization(metrics, getattr(transform, "mean", None), getattr(transform, "std", None))

    multi = len(settings) > 1
    entries = {(f"{name} [{s.name}]" if multi else name): (name, s) for s in settings for name in explainers}
    config = {
        "model": model_fingerprint(model, weights=out is not None),
        "dataset": dataset_identity(base),
        "explainers": {k: {"name": getattr(e, "registry_name", type(e).__name__),
                           "config": e.config.model_dump(mode="json")} for k, e in explainers.items()},
        "metrics": {k: {"name": getattr(m, "registry_name", type(m).__name__), "family": m.family,
                        "config": m.config.model_dump(mode="json")} for k, m in metrics.items()},
        "targets": [s.name for s in settings],
        "metric_targets": metric_setting.name if metric_setting else None,
        "seed": seed,
        **dict(identity or {}),
    }
    rank, world = _distributed()
    if world > 1 and out is None:
        raise InputError("evaluate under torchrun needs an output folder (out=...): each process writes its records")
    store = (RecordStore(out, config, list(entries), rank=rank, world=world, overwrite=overwrite) if out is not None
             else MemoryStore(list(entries)))
    finished = store.start()
    grid = [range(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]
    mine = [[i for i in chunk if i not in finished] for chunk in grid[rank::world]]
    mine = [c for c in mine if c]
    todo = sum(len(c) for c in mine)
    show = progress and rank == 0
    already = sum(1 for i in finished if i < n)
    if show and already:
        print(f"resuming: {already} of {n} images already evaluated in {out}", flush=True)

    device = next(iter(model.parameters()), torch.empty(0)).device
    loader = DataLoader(items, batch_sampler=mine, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    kept: dict[int, dict[str, torch.Tensor]] = {}
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=todo, unit="img", desc="evaluate", disable=not show or None, dynamic_ncols=True) as bar:
            for raw in loader:
                batch = _Batch(raw, model, device)
                chunk = batch.indices[0] // batch_size
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(seed * 1_000_003 + chunk)
                    records = _evaluate_batch(model, batch, explainers, metrics, entries, metric_setting, device,
                                              kept, keep_maps)
                store.append(records)
                bar.update(len(batch))
    finally:
        model.train(was_training)

    done = store.finish(n)
    summary = summarize(done, list(entries), metrics, resamples=resamples, confidence=confidence, seed=seed)
    examples, maps = None, {}
    if keep_maps and rank == 0:
        examples, maps = _examples(model, items, explainers, entries, device, kept, min(keep_maps, n), seed,
                                   batch_size)
    return EvaluationResult(entries=list(entries), metrics=metrics, config=config, config_hash=store.hash,
                            confidence=confidence, resamples=resamples, maps=maps, example_images=examples,
                            out=None if out is None else str(out), resumed=already, **summary)


def _examples(model: nn.Module, items: ItemView, explainers: dict[str, Explainer],
              entries: dict[str, tuple[str, TargetSetting]], device: torch.device,
              kept: dict[int, dict[str, torch.Tensor]], k: int, seed: int, batch_size: int):
    """Images (k, C, H, W) and maps {entry: (k, H, W)} of the first ``k`` images: those kept during
    the run, the others (resumed runs, other processes' batches) explained now."""
    need = [i for i in range(k) if i not in kept or len(kept[i]) < len(entries) + 1]
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(need), batch_size):
            batch = _Batch(collate([items[i] for i in need[lo:lo + batch_size]]), model, device)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed * 1_000_003 + batch.indices[0] // batch_size)
                _evaluate_batch(model, batch, explainers, {}, entries, None, device, kept, k)
    finally:
        model.train(was_training)
    images = torch.stack([kept[i]["image"] for i in range(k)])
    return images, {e: torch.stack([kept[i][e] for i in range(k)]) for e in entries}


def _evaluate_batch(model: nn.Module, batch: _Batch, explainers: dict[str, Explainer], metrics: dict[str, Metric],
                    entries: dict[str, tuple[str, TargetSetting]], metric_setting: TargetSetting | None,
                    device: torch.device, kept: dict[int, dict[str, torch.Tensor]], keep: int) -> list[dict]:
    records: list[dict] = []
    for entry, (name, setting) in entries.items():
        images, classes = batch.rows(setting)
        x = batch.images if images == list(range(len(batch))) else batch.images[images]
        explain_targets = _as_targets(classes, setting, device)
        if metric_setting is None:
            score_targets = None if setting.kind == "custom" else explain_targets
        else:
            score_targets = _as_targets(batch.metric_classes(metric_setting, images, classes, setting),
                                        metric_setting, device)
        _sync(device)
        t0 = time.perf_counter()
        maps = explainers[name].explain(model, x, explain_targets)
        _sync(device)
        explain_seconds = time.perf_counter() - t0
        masks = batch.masks(images, classes) if any(m.family in MASK_FAMILIES for m in metrics.values()) else None
        values: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        seconds: dict[str, float] = {}
        for mname, metric in metrics.items():
            t0 = time.perf_counter()
            if metric.family == "explanation":
                values[mname] = metric.compute(model, x, maps, score_targets)
            else:
                values[mname] = metric.compute(maps, masks)
                if isinstance(metric, PooledMetric):
                    stats[mname] = metric.statistics(maps, masks)
            _sync(device)
            seconds[mname] = time.perf_counter() - t0
        for k, i in enumerate(images):
            index = batch.indices[i]
            if index < keep and entry not in kept.setdefault(index, {}):
                kept[index][entry] = maps[k].detach().cpu()
                kept[index].setdefault("image", batch.images[i].detach().cpu())
        r = len(images)
        vals = {m: v.detach().double().cpu().tolist() for m, v in values.items()}
        sts = {m: s.detach().double().cpu().tolist() for m, s in stats.items()}
        per_image: dict[int, int] = {}
        for i in images:
            per_image[i] = per_image.get(i, 0) + 1
        seen: dict[int, int] = {}
        for k, (i, c) in enumerate(zip(images, classes)):
            row = seen.get(i, 0)
            seen[i] = row + 1
            records.append({
                "index": batch.indices[i], "id": batch.ids[i], "entry": entry, "row": row, "rows": per_image[i],
                "target": c,
                "values": {m: json_number(v[k]) for m, v in vals.items()},
                "statistics": {m: [json_number(a) for a in s[k]] for m, s in sts.items()},
                "seconds": {"explain": explain_seconds / r, "metrics": {m: t / r for m, t in seconds.items()}},
            })
    return records

