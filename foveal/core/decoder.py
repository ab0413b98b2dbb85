"""Decoder interface: backbone features -> segmentation logits."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from .component import Component


class Decoder(Component, nn.Module, ABC):
    """Dense prediction head.

    Contract:
      * input: ``features`` the list a :class:`Backbone` returns (its ``channels`` are given to
        the decoder at build time through its config), and ``image_size`` (H, W) of the input;
      * output: logits (B, num_classes, H, W) at ``image_size`` (float, not passed through a
        sigmoid/softmax). Decoders with deep supervision may return extra side outputs from
        :meth:`forward_all`; ``forward`` always returns the main logits only.
    """

    kind = "decoder"

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        nn.Module.__init__(self)
        self._init_config(config, overrides)

    @abstractmethod
    def forward(
        self, features: list[torch.Tensor], image_size: tuple[int, int]
    ) -> torch.Tensor: ...

    def forward_all(
        self, features: list[torch.Tensor], image_size: tuple[int, int]
    ) -> list[torch.Tensor]:
        """Main logits first, then any deep-supervision outputs (all at ``image_size``)."""
        return [self.forward(features, image_size)]
