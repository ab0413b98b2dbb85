"""From per-image records to dataset values: each metric's own ``aggregate`` (pooled metrics from
the summed per-image statistics) and percentile-bootstrap confidence intervals over images.

Bootstrap (Efron & Tibshirani 1993, ch. 13, the percentile interval): ``resamples`` times, draw
as many images as there are, with replacement, from a ``numpy.random.default_rng(seed)``
generator; compute the dataset value of the resample with the metric's own aggregate; the
interval is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of those values
(``numpy.quantile``, linear interpolation), NaN resample values left out. The same resamples
(same images) are used for every explainer and metric, so intervals of different methods are
paired. An image explained for several classes (VOC with ``targets="label"``) is resampled as a
whole, with all its rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.metric import Metric, PooledMetric


@dataclass
class EvaluationResult:
    """What :func:`foveal.evaluation.evaluate` returns.

    Keys ``entry`` are the explainer names (``"grad-cam"``; with several target settings
    ``"grad-cam [label]"``), ``metric`` the metric names. ``rows[entry]`` lists, in dataset order,
    ``{"index", "id", "target"}`` of every evaluated (image, class) row; ``per_image[entry][metric]``
    the values (float64 (R,), NaN = not counted), ``statistics[entry][metric]`` the (R, k) per-image
    sufficient statistics of pooled metrics; ``aggregates`` and ``ci`` the dataset values and
    their (low, high) bootstrap interval; ``seconds[entry]`` the mean seconds per image of the
    explanation (``"explain"``) and of each metric; with ``keep_maps=K``, ``example_images`` (K, C,
    H, W) (as given to the model) and ``maps[entry]`` (K, H, W) of the first K images; ``resumed``
    the number of images already finished in ``out`` when the run started.
    """

    entries: list[str]
    metrics: dict[str, Metric]
    rows: dict[str, list[dict]]
    per_image: dict[str, dict[str, np.ndarray]]
    statistics: dict[str, dict[str, np.ndarray]]
    aggregates: dict[str, dict[str, float]]
    ci: dict[str, dict[str, tuple[float, float]]]
    seconds: dict[str, dict[str, float]]
    images: int
    config: dict = field(default_factory=dict)
    config_hash: str | None = None
    confidence: float = 0.95
    resamples: int = 1000
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    example_images: torch.Tensor | None = None
    out: str | None = None
    resumed: int = 0

    def table(self) -> list[dict[str, Any]]:
        """One dict per entry: the aggregate of every metric and the interval as ``"metric ci"``."""
        rows = []
        for e in self.entries:
            row: dict[str, Any] = {"method": e}
            for m in self.metrics:
                row[m] = self.aggregates[e][m]
                row[f"{m} ci"] = self.ci[e][m]
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (values, intervals, timing, per-image values)."""
        from .records import json_number

        return {
            "images": self.images,
            "config_hash": self.config_hash,
            "confidence": self.confidence,
            "bootstrap_resamples": self.resamples,
            "results": {e: {m: json_number(v) for m, v in r.items()} for e, r in self.aggregates.items()},
            "ci": {e: {m: [json_number(lo), json_number(hi)] for m, (lo, hi) in r.items()} for e, r in self.ci.items()},
            "seconds": self.seconds,
            "rows": self.rows,
            "per_image": {e: {m: [json_number(v) for v in vs] for m, vs in r.items()}
                          for e, r in self.per_image.items()},
        }


def summarize(done: dict[int, list[dict]], entries: list[str], metrics: dict[str, Metric], *,
              resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Per-entry rows, values, statistics, aggregates, intervals and timing of finished records
    (``done``: dataset index -> that image's records)."""
    indices = sorted(done)
    rows: dict[str, list[dict]] = {e: [] for e in entries}
    values: dict[str, dict[str, list[float]]] = {e: {m: [] for m in metrics} for e in entries}
    stats: dict[str, dict[str, list[list[float]]]] = {e: {m: [] for m in metrics if _pooled(metrics[m])}
                                                      for e in entries}
    seconds: dict[str, dict[str, float]] = {e: {"explain": 0.0, **{m: 0.0 for m in metrics}} for e in entries}
    image_of: dict[str, list[int]] = {e: [] for e in entries}
    for position, index in enumerate(indices):
        for r in done[index]:
            e = r["entry"]
            rows[e].append({"index": index, "id": r["id"], "target": r.get("target")})
            image_of[e].append(position)
            for m in metrics:
                v = r["values"].get(m)
                values[e][m].append(float("nan") if v is None else float(v))
                if m in stats[e]:
                    stats[e][m].append([float("nan") if s is None else float(s) for s in r["statistics"][m]])
            sec = r.get("seconds", {})
            seconds[e]["explain"] += float(sec.get("explain", 0.0))
            for m in metrics:
                seconds[e][m] += float(sec.get("metrics", {}).get(m, 0.0))
    n = len(indices)
    per_image = {e: {m: np.asarray(v, dtype=np.float64) for m, v in values[e].items()} for e in entries}
    statistics = {e: {m: np.asarray(s, dtype=np.float64).reshape(len(s), -1) for m, s in stats[e].items()}
                  for e in entries}
    aggregates, ci = {}, {}
    for e in entries:
        cells = {m: (metric, statistics[e][m] if m in statistics[e] else per_image[e][m])
                 for m, metric in metrics.items()}
        aggregates[e] = {m: aggregate(metric, data) for m, (metric, data) in cells.items()}
        ci[e] = bootstrap_intervals(cells, np.asarray(image_of[e], dtype=np.int64), n, resamples=resamples,
                                    confidence=confidence, seed=seed)
    return {"rows": rows, "per_image": per_image, "statistics": statistics, "aggregates": aggregates, "ci": ci,
            "seconds": {e: {k: v / max(n, 1) for k, v in s.items()} for e, s in seconds.items()}, "images": n}


def _pooled(metric: Metric) -> bool:
    return isinstance(metric, PooledMetric)


def aggregate(metric: Metric, data: np.ndarray) -> float:
    """The metric's own dataset value of per-image values (R,) or pooled statistics (R, k)."""
    if len(data) == 0:
        return float("nan")
    return float(metric.aggregate(torch.from_numpy(np.ascontiguousarray(data))))


def _plain_mean(metric: Metric) -> bool:
    return type(metric).aggregate is Metric.aggregate


def bootstrap_interval(metric: Metric, data: np.ndarray, groups: np.ndarray | None = None, images: int | None = None,
                       *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``aggregate(metric, data)`` over images (module docstring).

    ``data``: per-row values (R,) or statistics (R, k); ``groups`` (R,): the image (0..images-1) of
    each row (default: one row per image). ``resamples=0`` gives (NaN, NaN)."""
    return bootstrap_intervals({"m": (metric, data)}, groups, images, resamples=resamples, confidence=confidence,
                               seed=seed)["m"]


def bootstrap_intervals(cells: dict[str, tuple[Metric, np.ndarray]], groups: np.ndarray | None = None,
                        images: int | None = None, *, resamples: int = 1000, confidence: float = 0.95,
                        seed: int = 0) -> dict[str, tuple[float, float]]:
    """:func:`bootstrap_interval` of several metrics whose rows are the same images, with the same
    resamples (drawn once)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    nan = (float("nan"), float("nan"))
    r = len(next(iter(cells.values()))[1]) if cells else 0
    if resamples <= 0 or r == 0:
        return {name: nan for name in cells}
    groups = np.arange(r) if groups is None else np.asarray(groups, dtype=np.int64)
    images = int(groups.max()) + 1 if images is None else int(images)
    rng = np.random.default_rng(seed)
    estimates = {name: np.empty(resamples) for name in cells}
    chunk = max(1, min(resamples, 4_000_000 // max(images, 1)))
    for lo in range(0, resamples, chunk):
        k = min(chunk, resamples - lo)
        picks = rng.integers(0, images, size=(k, images))
        flat = (np.arange(k)[:, None] * images + picks).ravel()
        counts = np.bincount(flat, minlength=k * images).reshape(k, images).astype(np.float64)
        weights = counts[:, groups]  # (k, R): how often each row is drawn
        for name, (metric, data) in cells.items():
            out = estimates[name]
            if data.ndim == 1 and _plain_mean(metric):
                valid = ~np.isnan(data)
                num = weights[:, valid] @ data[valid]
                den = weights[:, valid].sum(1)
                out[lo:lo + k] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
            else:
                for j in range(k):
                    idx = np.repeat(np.arange(r), weights[j].astype(np.int64))
                    out[lo + j] = aggregate(metric, data[idx])
    alpha = (1 - confidence) / 2
    result = {}
    for name, values in estimates.items():
        values = values[~np.isnan(values)]
        result[name] = tuple(float(q) for q in np.quantile(values, [alpha, 1 - alpha])) if values.size else nan
    return result
