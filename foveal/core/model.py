"""Composite models (backbone + decoder, backbone + pooling + classifier) as components."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .component import Component


class Model(Component, nn.Module):
    """A ready ``nn.Module`` built from the registry, with its config attached.

    ``task`` is ``"segmentation"`` (``forward`` returns logits (B, K, H, W) at input size) or
    ``"classification"`` (``forward`` returns logits (B, K)). Input: float images (B, 3, H, W).
    """

    kind = "model"
    task: ClassVar[str] = ""

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        nn.Module.__init__(self)
        self._init_config(config, overrides)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
