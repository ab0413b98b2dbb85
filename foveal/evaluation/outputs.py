"""What an evaluation writes for people to look at: ``results.md`` (a table of explainer x metric
with bootstrap intervals and timing), ``results.json``, ``results.png`` (one bar chart per metric
with interval whiskers), ``maps.png`` (the first images with every explainer's map) and
``report.html`` (the layout of :mod:`foveal.report`: maps grid, table, timing). Every file is
written atomically."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.checkpoint import atomic_write_bytes
from .records import json_number, write_text_atomic
from .results import EvaluationResult


def fmt(v: float, digits: int = 4) -> str:
    return "nan" if v is None or v != v else f"{v:.{digits}f}"


def _arrow(metric: Any) -> str:
    return "↑" if metric.higher_is_better else "↓"


def results_markdown(result: EvaluationResult, title: str = "") -> str:
    """The table (value and ``[low, high]`` interval per cell), then the timing table."""
    cols = list(result.metrics)
    head = "| method | " + " | ".join(f"{c} {_arrow(result.metrics[c])}" for c in cols) + " |\n"
    sep = "|---|" + "---:|" * len(cols) + "\n"
    body = ""
    for e in result.entries:
        cells = []
        for c in cols:
            lo, hi = result.ci[e][c]
            ci = f" [{fmt(lo)}, {fmt(hi)}]" if lo == lo else ""
            cells.append(fmt(result.aggregates[e][c]) + ci)
        body += f"| {e} | " + " | ".join(cells) + " |\n"
    level = round(100 * result.confidence)
    intro = (title + "\n\n" if title else "") + (
        f"Explanation metrics on {result.images} images (each metric's own aggregate: the mean over images unless "
        f"pooled); [{level}% percentile-bootstrap interval over images, {result.resamples} resamples].\n\n")
    timing = "\n| method | explain s/img | " + " | ".join(f"{c} s/img" for c in cols) + " | total s/img |\n"
    timing += "|---|---:|" + "---:|" * len(cols) + "---:|\n"
    for e in result.entries:
        s = result.seconds[e]
        total = s["explain"] + sum(s[c] for c in cols)
        timing += f"| {e} | {s['explain']:.4g} | " + " | ".join(f"{s[c]:.4g}" for c in cols) + f" | {total:.4g} |\n"
    return intro + head + sep + body + timing


def plot_results(result: EvaluationResult, path: str | Path) -> Path:
    """One bar chart per metric, a bar per explainer with its bootstrap interval as a whisker."""
    from matplotlib.figure import Figure

    cols, entries = list(result.metrics), result.entries
    fig = Figure(figsize=(max(4.0, 3.2 * len(cols)), 3.6))
    axes = fig.subplots(1, len(cols), squeeze=False)[0]
    colors = [f"C{i % 10}" for i in range(len(entries))]
    for ax, c in zip(axes, cols):
        vals = np.array([result.aggregates[e][c] for e in entries], dtype=float)
        lo = np.array([result.ci[e][c][0] for e in entries], dtype=float)
        hi = np.array([result.ci[e][c][1] for e in entries], dtype=float)
        shown = np.nan_to_num(vals)
        err = np.stack([np.nan_to_num(shown - lo), np.nan_to_num(hi - shown)]).clip(min=0)
        ax.bar(range(len(entries)), shown, color=colors, yerr=err, capsize=3, ecolor="#333")
        ax.set_xticks(range(len(entries)))
        ax.set_xticklabels(entries, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{c} ({'higher' if result.metrics[c].higher_is_better else 'lower'} is better)", fontsize=9)
        for i, v in enumerate(vals):
            ax.text(i, 0 if v != v else v, fmt(v, 3), ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return atomic_write_bytes(buffer.getvalue(), path)


def maps_grid(result: EvaluationResult, mean: Sequence[float], std: Sequence[float], min_size: int = 128) -> np.ndarray:
    """Rows: the kept images; columns: the image, then every explainer's map over it."""
    import torch

    from ..data.images import to_uint8
    from ..viz import grid, heatmap_overlay

    images = result.example_images
    maps = [result.maps[e] for e in result.entries]
    scale = max(1, -(-min_size // images.shape[-1]))  # show small images at >= min_size px
    if scale > 1:
        images = torch.nn.functional.interpolate(images.float(), scale_factor=scale, mode="nearest")
        maps = [torch.nn.functional.interpolate(m[:, None].float(), scale_factor=scale, mode="bilinear")[:, 0]
                for m in maps]
    rgb = to_uint8(images, mean, std)
    cells = [[rgb[i]] + [heatmap_overlay(rgb[i], m[i].clamp(0, 1).numpy()) for m in maps] for i in range(len(rgb))]
    return grid(cells, col_labels=["image", *result.entries])


def results_json(result: EvaluationResult, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    metrics = {k: {"name": getattr(m, "registry_name", type(m).__name__), "family": m.family,
                   "higher_is_better": bool(m.higher_is_better), "config": m.config.model_dump(mode="json")}
               for k, m in result.metrics.items()}
    return {**dict(extra or {}), "metrics": metrics, **result.to_dict()}


def write_outputs(result: EvaluationResult, out: str | Path, *, title: str = "foveal evaluate-explanations",
                  subtitle: str = "", extra: Mapping[str, Any] | None = None, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None) -> dict[str, Path]:
    """Write results.md, results.json, results.png and, with kept maps, maps.png and report.html."""
    from ..data.images import IMAGENET_MEAN, IMAGENET_STD
    from ..report import Report
    from ..viz import png_bytes

    out = Path(out)
    paths = {"md": write_text_atomic(out / "results.md", results_markdown(result)),
             "json": write_text_atomic(out / "results.json", json.dumps(results_json(result, extra), indent=1,
                                                                         default=_json_default) + "\n"),
             "png": plot_results(result, out / "results.png")}
    picture = None
    if result.example_images is not None and result.maps:
        picture = maps_grid(result, mean or IMAGENET_MEAN, std or IMAGENET_STD)
        paths["maps"] = atomic_write_bytes(png_bytes(picture), out / "maps.png")
    report = Report(title, subtitle)
    report.section("Setup", f"{result.images} images; {len(result.entries)} explainers x {len(result.metrics)} "
                   f"metrics; configuration {result.config_hash or 'in memory'}.")
    if picture is not None:
        report.image(picture, "the first images with every explainer's map")
    level = round(100 * result.confidence)
    rows = []
    for e in result.entries:
        row: dict[str, Any] = {"method": e}
        for c in result.metrics:
            lo, hi = result.ci[e][c]
            row[f"{c} {_arrow(result.metrics[c])}"] = fmt(result.aggregates[e][c]) + (
                f" [{fmt(lo)}, {fmt(hi)}]" if lo == lo else "")
        rows.append(row)
    report.section("Scores", f"Each metric's dataset value with its {level}% percentile-bootstrap interval over "
                   f"images ({result.resamples} resamples).")
    report.table(rows, "explainer x metric")
    report.image(paths["png"], "dataset values with bootstrap intervals")
    report.section("Timing", "Mean seconds per image of each explainer and of each metric on its maps.")
    timing = []
    for e in result.entries:
        s = result.seconds[e]
        total = s["explain"] + sum(s[c] for c in result.metrics)
        timing.append({"method": e, "explain s": s["explain"], **{f"{c} s": s[c] for c in result.metrics},
                       "total s": total, "images/s": (1 / total) if total > 0 else math.inf})
    report.table(timing, "seconds per image")
    paths["html"] = report.write(out / "report.html")
    return paths


def _json_default(v: Any) -> Any:
    if isinstance(v, float):
        return json_number(v)
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return str(v)
