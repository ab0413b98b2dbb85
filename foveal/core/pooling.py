"""Pooling interface: feature map(s) -> one global vector per image."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from .component import Component


class Pooling(Component, nn.Module, ABC):
    """Global pooling in front of a classifier (GAP, CA-Stream, ...).

    Contract:
      * input: a feature map (B, C, h, w) or, for poolings that read several stages
        (``multi_stage = True``), the list of stage feature maps from high to low resolution;
      * output: (B, D) with ``D == self.out_features``;
      * poolings with attention set ``self.last_attention`` to a (B, h, w) map of the last
        call (pre-softmax scores over positions), or leave it ``None``.
    """

    kind = "pooling"
    multi_stage: bool = False

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        nn.Module.__init__(self)
        self._init_config(config, overrides)
        self.last_attention: torch.Tensor | None = None

    @property
    @abstractmethod
    def out_features(self) -> int:
        """Width D of the pooled vector."""

    @abstractmethod
    def forward(self, features: torch.Tensor | list[torch.Tensor]) -> torch.Tensor: ...
