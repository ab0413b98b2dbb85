"""``foveal evaluate-explanations``: score explainers on an image folder with chosen metrics.

Writes ``OUT/results.json`` (config, per-image values, dataset values), ``OUT/results.md`` (one
row per explainer, one column per metric), ``OUT/results.png`` (one bar chart per metric) and
``OUT/maps.png`` (the first images with each explainer's map).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from ..core.errors import InputError
from .options import build_component, load_model, parse_spec  # noqa: F401 (parse_spec: public here too)

DESCRIPTION = """\
Score saliency explainers on images with chosen metrics.

Components are given as NAME or NAME:key=value,key=value (values are parsed as JSON when
possible, e.g. insertion:steps=50,baseline="zero" or perturbation-auc:mode=negative).
--model is a foveal checkpoint file, a registered model (e.g. gap-classifier:model_name=resnet50),
or timm:NAME for a randomly initialised timm model (add --weights FILE for trained weights).
Localisation and segmentation metrics (pointing-game, saliency-segmentation, dice, ...) need
--masks DIR with one mask per image, matched by file stem; segmentation metrics score the map
itself as a soft segmentation. Images are resized to --size and ImageNet-normalised.
"""


def add_commands(sub) -> None:
    p = sub.add_parser("evaluate-explanations", help="score explainers on images with explanation metrics",
                       description=DESCRIPTION, formatter_class=_raw_formatter())
    p.add_argument("images", nargs="+", help="image files and/or folders of images")
    p.add_argument("--model", required=True, help="checkpoint path, registered model NAME[:k=v,...], or timm:NAME")
    p.add_argument("--weights", default=None, help="weights file (.pth/.safetensors) loaded into a timm: model")
    p.add_argument("--method", action="append", required=True, metavar="EXPLAINER",
                   help="registered explainer, NAME[:k=v,...] (repeatable)")
    p.add_argument("--metric", action="append", required=True, metavar="METRIC",
                   help="registered metric, NAME[:k=v,...] (repeatable)")
    p.add_argument("--masks", default=None, help="folder of ground-truth masks (same file stems as the images)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--target", type=int, default=None, help="class to explain and score (default: predicted)")
    p.add_argument("--size", type=int, nargs="+", default=[224], metavar="PX",
                   help="resize images to SIZE or H W (default 224)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--grid", type=int, default=4, help="images shown in maps.png (0: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate_explanations)


def _raw_formatter():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def _collect_images(items: list[str]) -> list[Path]:
    from ..data.images import IMAGE_SUFFIXES, list_images

    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths += list_images(p)
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise InputError(f"{p}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
            paths.append(p)
        else:
            raise FileNotFoundError(f"image or folder not found: {p}")
    if not paths:
        raise InputError(f"no images found in {', '.join(items)}")
    return paths


def _mask_for(image: Path, folder: Path) -> Path:
    from ..data.images import IMAGE_SUFFIXES

    for cand in sorted(folder.iterdir()):
        if cand.stem == image.stem and cand.suffix.lower() in IMAGE_SUFFIXES:
            return cand
    raise FileNotFoundError(f"no mask for {image.name} in {folder} (expected a file named {image.stem}.png or similar)")


# ---------------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------------
def cmd_evaluate_explanations(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..data.images import read_mask, read_rgb, to_tensor

    size = tuple(args.size) * 2 if len(args.size) == 1 else tuple(args.size)
    if len(size) != 2 or min(size) < 1:
        raise InputError(f"--size: expected SIZE or H W (positive), got {args.size}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    from ..core.tensors import resolve_device

    device = resolve_device(args.device)
    paths = _collect_images(args.images)[: args.limit]
    masks_dir = Path(args.masks) if args.masks else None
    if masks_dir is not None and not masks_dir.is_dir():
        raise FileNotFoundError(f"--masks: folder not found: {masks_dir}")

    methods = {spec: build_component(spec, "explainer") for spec in args.method}
    metrics = {spec: build_component(spec, "metric") for spec in args.metric}
    needs_masks = [s for s, m in metrics.items() if m.family in ("localisation", "segmentation")]
    if needs_masks and masks_dir is None:
        raise InputError(f"metrics {', '.join(needs_masks)} compare maps with ground truth: pass --masks DIR")
    mask_paths = [_mask_for(p, masks_dir) for p in paths] if masks_dir is not None else None

    model = load_model(args.model, args.weights).to(device)
    was_training = model.training
    model.eval()
    per_image: dict[str, dict[str, list[float]]] = {m: {k: [] for k in metrics} for m in methods}
    stats: dict[str, dict[str, list[torch.Tensor]]] = {m: {k: [] for k in metrics} for m in methods}
    seconds = {m: 0.0 for m in methods}
    shown: list[tuple[Any, dict[str, Any]]] = []
    batches = range(0, len(paths), args.batch_size)
    try:
        for lo in tqdm(batches, desc="evaluate-explanations", disable=args.quiet or None):
            chunk = paths[lo : lo + args.batch_size]
            rgb = [read_rgb(p, size) for p in chunk]
            x = torch.stack([to_tensor(a) for a in rgb]).to(device)
            gt = None
            if mask_paths is not None:
                gt = torch.stack([torch.from_numpy(read_mask(m, size)) for m in mask_paths[lo : lo + len(chunk)]])
                gt = gt.to(device)
            targets = args.target
            batch_maps = {}
            for mspec, explainer in methods.items():
                t0 = time.perf_counter()
                maps = explainer.explain(model, x, targets)
                seconds[mspec] += time.perf_counter() - t0
                batch_maps[mspec] = maps
                for kspec, metric in metrics.items():
                    if metric.family == "explanation":
                        values = metric.compute(model, x, maps, targets)
                    else:
                        values = metric.compute(maps, gt)
                        if hasattr(metric, "statistics"):
                            stats[mspec][kspec].append(metric.statistics(maps, gt).cpu())
                    per_image[mspec][kspec] += [float(v) for v in values.detach().double().cpu()]
            for i, a in enumerate(rgb):
                if len(shown) < args.grid:
                    shown.append((a, {m: batch_maps[m][i].cpu().numpy() for m in methods}))
    finally:
        model.train(was_training)

    results: dict[str, dict[str, float]] = {}
    for mspec in methods:
        results[mspec] = {}
        for kspec, metric in metrics.items():
            if stats[mspec][kspec]:
                results[mspec][kspec] = metric.aggregate(torch.cat(stats[mspec][kspec]))
            else:
                results[mspec][kspec] = metric.aggregate(torch.tensor(per_image[mspec][kspec], dtype=torch.float64))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "model": args.model, "images": [str(p) for p in paths], "masks": [str(p) for p in mask_paths or []],
        "size": list(size), "target": args.target, "device": str(device),
        "methods": {m: {"name": e.registry_name, "config": e.config.model_dump(mode="json")}
                    for m, e in methods.items()},
        "metrics": {k: {"name": m.registry_name, "family": m.family, "higher_is_better": bool(m.higher_is_better),
                        "config": m.config.model_dump(mode="json")} for k, m in metrics.items()},
        "results": {m: {k: _json_float(v) for k, v in r.items()} for m, r in results.items()},
        "seconds_explaining": seconds,
        "per_image": {m: {k: [_json_float(v) for v in vs] for k, vs in r.items()} for m, r in per_image.items()},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(results_markdown(results, metrics, len(paths)))
    plot_results(results, metrics, out / "results.png")
    if shown:
        _save_maps(shown, list(methods), out / "maps.png")
    print(results_markdown(results, metrics, len(paths)))
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'results.png'}")
    return 0


def _json_float(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


def results_markdown(results: dict[str, dict[str, float]], metrics: dict[str, Any], n_images: int) -> str:
    cols = list(metrics)
    head = "| method | " + " | ".join(f"{c} {'↑' if metrics[c].higher_is_better else '↓'}" for c in cols) + " |\n"
    sep = "|---|" + "---:|" * len(cols) + "\n"
    rows = "".join(f"| {m} | " + " | ".join(_fmt(r[c]) for c in cols) + " |\n" for m, r in results.items())
    return f"Explanation metrics on {n_images} images (mean over images unless pooled).\n\n{head}{sep}{rows}"


def _fmt(v: float) -> str:
    return "nan" if v != v else f"{v:.4f}"


def plot_results(results: dict[str, dict[str, float]], metrics: dict[str, Any], path: Path) -> Path:
    """One bar chart per metric, a bar per method."""
    from matplotlib.figure import Figure

    cols = list(metrics)
    methods = list(results)
    fig = Figure(figsize=(max(4.0, 3.2 * len(cols)), 3.4))
    axes = fig.subplots(1, len(cols), squeeze=False)[0]
    colors = [f"C{i % 10}" for i in range(len(methods))]
    for ax, c in zip(axes, cols):
        vals = [results[m][c] for m in methods]
        ax.bar(range(len(methods)), [0 if v != v else v for v in vals], color=colors)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{c} ({'higher' if metrics[c].higher_is_better else 'lower'} is better)", fontsize=9)
        for i, v in enumerate(vals):
            ax.text(i, 0 if v != v else v, _fmt(v), ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _save_maps(shown, methods: list[str], path: Path) -> None:
    from ..viz import grid, heatmap_overlay, save_image

    cells = [[rgb] + [heatmap_overlay(rgb, maps[m]) for m in methods] for rgb, maps in shown]
    save_image(grid(cells, col_labels=["image", *methods]), path)
