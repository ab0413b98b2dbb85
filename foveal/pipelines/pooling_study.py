"""GAP versus CA-Stream pooling, scored as in Table 1 of CA-Stream (ca-stream.txt, section 4):
accuracy, and for each pooling Grad-CAM, Grad-CAM++ and Score-CAM scored with average drop (AD),
average gain (AG), average increase (AI), insertion (I) and deletion (D).

Used by ``examples/ca_stream_table1.py`` and by ``foveal demo``. The scores run through
:func:`foveal.evaluation.evaluate` with the ``ca-stream-table1`` protocol
(:mod:`foveal.evaluation.protocols`), i.e. as the authors' evaluation code computes them
(``ftorres11/CA_Stream`` ``engine/evaluation.py``): the ground-truth class is explained and scored;
AD/AG/AI in percent on ``normalise(denormalise(x) * map)`` (the soft map over a black image in pixel
space, softmax probabilities); I/D are areas under the softmax-probability curve with 8 image rows
of pixels per step (insertion from the 5 x 5, sigma 5 blur, deletion to zeros of the normalised
tensor), reported x100 as in the paper.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from .. import registry
from ..core.errors import InputError
from ..data.classification import ImageFolderDataset, make_synthetic_classes, split_folder
from ..data.images import IMAGENET_MEAN, IMAGENET_STD, to_uint8
from ..models.ca_stream import TimmClassifier, wrap_classifier
from ..registry.checkpoints import load
from ..viz import grid, heatmap_overlay, save_image

METHODS = ("grad-cam", "grad-cam++", "score-cam")
METRICS = ("average-drop", "average-gain", "average-increase", "insertion", "deletion")
COLUMNS = {"average-drop": "AD↓", "average-gain": "AG↑", "average-increase": "AI↑", "insertion": "I↑",
           "deletion": "D↓"}
PERCENT = {"insertion", "deletion"}  # areas in [0, 1], shown x100 as in Table 1


def synthetic_setup(out: Path, seed: int, progress: bool) -> tuple[Path, Path]:
    """Synthetic shapes (64 px), a tiny ResNet-18 (channels 16-128, output stride 16 so layer4
    is 4x4) trained from scratch with GAP, then CA-Stream trained on it with everything frozen."""
    from foveal.training.classification import train_classifier

    data = make_synthetic_classes(out / "data", num_classes=4, train_per_class=40, val_per_class=8, size=64,
                                  seed=seed)
    common = {"data": str(data), "batch_size": 16, "image_size": 64, "crop_scale": (0.6, 1.0), "workers": 0,
              "seed": seed, "progress": progress, "overwrite": True}  # the study regenerates its runs
    gap = train_classifier(out=str(out / "gap"), pooling="gap", model_name="resnet18",
                           model_kwargs={"channels": [16, 32, 64, 128], "output_stride": 16}, epochs=8, lr=0.1,
                           lr_step=6, **common)
    ca = train_classifier(out=str(out / "ca"), pooling="ca-stream", init=str(gap["model_path"]), epochs=4, lr=0.1,
                          lr_step=3, **common)
    return data, ca["model_path"]


def explainer(method: str, model: TimmClassifier, progress: bool):
    """The CAM explainer on the backbone's last stage (the same layer for GAP and CA)."""
    quiet = {} if progress or "progress" not in registry.info(method)["fields"] else {"progress": False}
    return registry.build(method, target_layer=model.target_layer, **quiet)


def evaluate(models: dict[str, TimmClassifier], dataset, methods, *, image_size: int, batch_size: int = 16,
             steps: int | None = None, limit: int | None = None, device=None, progress: bool = True) -> dict:
    """Accuracy per pooling and the dataset value of every (method, pooling, metric) under the
    ``ca-stream-table1`` protocol (``steps`` overrides its insertion/deletion step count)."""
    from ..evaluation import evaluate as evaluate_explanations
    from ..evaluation import get_protocol

    n = len(dataset) if limit is None else min(limit, len(dataset))
    metrics = get_protocol("ca-stream-table1").metrics(image_size, IMAGENET_MEAN, IMAGENET_STD)
    for name in ("insertion", "deletion") if steps is not None else ():
        metrics[name] = registry.build(name, **{**metrics[name].config.model_dump(), "steps": steps})
    scores: dict = {meth: {} for meth in methods}
    for pool, model in models.items():
        explainers = {meth: explainer(meth, model, progress) for meth in methods}
        result = evaluate_explanations(model, dataset, explainers, metrics, targets="label", metric_targets="label",
                                       batch_size=batch_size, limit=n, resamples=0, progress=progress)
        for meth in methods:
            scores[meth][pool] = {name: v * (100 if name in PERCENT else 1)
                                  for name, v in result.aggregates[meth].items()}
    correct = {pool: 0 for pool in models}
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        for pool, model in models.items():
            with torch.no_grad():
                correct[pool] += int((model(images).argmax(1) == labels).sum())
    return {"images": n, "accuracy": {pool: 100 * c / max(n, 1) for pool, c in correct.items()}, "scores": scores}


def format_table(results: dict) -> str:
    lines = ["| Pooling | Acc↑ |", "|---|---|"]
    lines += [f"| {pool.upper()} | {acc:.2f} |" for pool, acc in results["accuracy"].items()]
    lines += ["", "| Attribution | Pooling | " + " | ".join(COLUMNS.values()) + " |",
              "|---|---|" + "---|" * len(COLUMNS)]
    for meth, by_pool in results["scores"].items():
        for pool, vals in by_pool.items():
            lines.append(f"| {meth} | {pool.upper()} | " + " | ".join(f"{vals[m]:.2f}" for m in COLUMNS) + " |")
    return "\n".join(lines)


def figure(models: dict[str, TimmClassifier], images: torch.Tensor, methods, min_size: int = 128) -> np.ndarray:
    """Rows: images; columns: input, each method with GAP and CA, CA raw attention (Figure 2).
    Images smaller than ``min_size`` are shown enlarged."""
    cols, maps = ["input"], []
    for meth in methods:
        for pool, model in models.items():
            cols.append(f"{meth} {pool.upper()}")
            maps.append(explainer(meth, model, progress=False).explain(model, images))
    cols.append("CA raw attention")
    maps.append(registry.build("ca-attention").explain(models["ca"], images))
    scale = max(1, -(-min_size // images.shape[-1]))
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
        maps = [torch.nn.functional.interpolate(m[:, None], scale_factor=scale, mode="bilinear")[:, 0] for m in maps]
    rgb = to_uint8(images)
    rows = [[rgb[i]] + [heatmap_overlay(rgb[i], m[i].cpu().numpy()) for m in maps] for i in range(len(rgb))]
    return grid(rows, col_labels=cols)


def run_table1(
    out: str | Path,
    *,
    data: str | Path | None = None,
    ca: str | Path | None = None,
    gap: str | Path | None = None,
    synthetic: bool = False,
    methods=METHODS,
    limit: int | None = None,
    batch_size: int = 16,
    image_size: int = 224,
    steps: int | None = None,
    figure_images: int = 4,
    device: str | None = None,
    seed: int = 0,
    progress: bool = True,
    verbose: bool = True,
) -> dict:
    """Evaluate a CA-Stream checkpoint ``ca`` against ``gap`` (default: the same frozen network
    with its own GAP) on the ``val`` split of the image-folder dataset ``data``, or, with
    ``synthetic=True``, on a synthetic set with a tiny ResNet trained here first. Writes
    ``OUT/table1.md``, ``OUT/table1.json`` and ``OUT/figure.png``; returns the results (with the
    figure as ``results["figure"]``, a uint8 array, when one was drawn)."""
    from types import SimpleNamespace

    args = SimpleNamespace(out=out, data=data, ca=ca, gap=gap, synthetic=synthetic, methods=list(methods),
                           limit=limit, batch_size=batch_size, image_size=image_size, steps=steps,
                           figure_images=figure_images, device=device, seed=seed, quiet=not progress)
    if not synthetic and not (data and ca):
        raise InputError("run_table1: give data and ca (and optionally gap), or synthetic=True")
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.time()
    if args.synthetic:
        data, ca_path = synthetic_setup(out, args.seed, progress)
        image_size, gap_path = 64, None
    else:
        data, ca_path, gap_path, image_size = Path(args.data), args.ca, args.gap, args.image_size
    ca = load(ca_path).to(device).eval()
    if not isinstance(ca, TimmClassifier) or ca.pool is None:
        raise InputError(f"ca: {ca_path} is not a ca-stream-classifier checkpoint")
    gap = (load(gap_path) if gap_path else wrap_classifier(ca, pooling="gap")).to(device).eval()
    models = {"gap": gap, "ca": ca}

    dataset = ImageFolderDataset(split_folder(data, "val"), image_size=image_size)
    results = evaluate(models, dataset, args.methods, image_size=image_size, batch_size=args.batch_size,
                       steps=args.steps, limit=args.limit, device=device, progress=progress)
    results.update(seconds=round(time.time() - t0, 1), data=str(data), ca=str(ca_path),
                   gap=str(gap_path) if gap_path else "CA model's network with GAP")
    table = format_table(results)
    (out / "table1.md").write_text(table + "\n")
    (out / "table1.json").write_text(json.dumps(results, indent=2))
    k = min(args.figure_images, results["images"])
    if k:
        picks = np.linspace(0, results["images"] - 1, k).round().astype(int)  # spread over the classes
        images = torch.stack([dataset[int(i)][0] for i in picks]).to(device)
        picture = figure(models, images, args.methods)
        save_image(picture, out / "figure.png")
    if verbose:
        print(table)
        print(f"\n{results['images']} images, {results['seconds']} s; wrote {out}/table1.md, table1.json, figure.png")
    if k:
        results["figure"] = picture
    return results


