"""Metric interfaces for explanations, localisation and segmentation."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from .component import PlainComponent
from .errors import InputError


class Metric(PlainComponent, ABC):
    """A score with documented conventions.

    ``compute(...)`` returns per-sample scores, a float tensor (B,), on the inputs' device;
    ``NaN`` marks a sample that is not counted (for example an empty ground-truth mask in the
    pointing game). :meth:`aggregate` reduces them (mean over counted samples by default; a
    metric with pooled averaging overrides it). Inputs are never modified. Per-sample values do
    not depend on batch size or on the other samples in the batch.

    Families and their ``compute`` signatures:
      * ``"explanation"``: ``compute(model, images, saliency, targets=None)`` with images
        (B, C, H, W), saliency (B, H, W) in any scale (only the order matters for rank-based
        metrics), targets as for explainers (``None`` = predicted class);
      * ``"localisation"``: ``compute(saliency, masks)`` with masks (B, H, W) bool;
      * ``"segmentation"``: ``compute(predictions, masks)`` with predictions (B, H, W) as
        probabilities in [0, 1] or bool, masks (B, H, W) bool.
    """

    kind = "metric"
    family: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        self._init_config(config, overrides)

    @abstractmethod
    def compute(self, *args: Any, **kwargs: Any) -> torch.Tensor: ...

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.compute(*args, **kwargs)

    def aggregate(self, per_sample: torch.Tensor) -> float:
        """Mean over counted (non-NaN) samples; NaN when none is counted."""
        v = per_sample.detach().double().flatten()
        v = v[~torch.isnan(v)]
        return float(v.mean()) if v.numel() else float("nan")


class PooledMetric(Metric):
    """Metrics whose dataset value may pool counts over images (``averaging="pooled"``).

    ``compute`` still returns per-image values. For the dataset value use
    ``aggregate(torch.cat([m.statistics(...) for each batch]))`` or ``score(...)`` on one batch.
    """

    n_statistics: ClassVar[int] = 0

    def statistics(self, *args: Any) -> torch.Tensor:  # pragma: no cover - abstract in practice
        raise NotImplementedError

    def reduce(self, statistics: torch.Tensor) -> float:  # pragma: no cover - abstract in practice
        raise NotImplementedError

    def score(self, *args: Any) -> float:
        """The dataset value of this batch with the configured averaging."""
        return self.reduce(self.statistics(*args))

    def aggregate(self, per_sample: torch.Tensor) -> float:
        """Per-image values (B,) with ``averaging="per-image"``: their mean over counted samples.
        Statistics (N, k) from :meth:`statistics` (either averaging): the configured reduction."""
        if per_sample.dim() == 2 and per_sample.shape[1] == self.n_statistics:
            return self.reduce(per_sample)
        if self.config.averaging == "pooled":
            raise InputError(
                f"{type(self).__name__} with averaging='pooled' reduces counts, not per-image values: pass "
                f"torch.cat([metric.statistics(...) for each batch]) (shape (N, {self.n_statistics})) to "
                "aggregate(), or use metric.score(...)"
            )
        return super().aggregate(per_sample)
