"""Backbone interface: image batch -> multi-scale feature maps."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from .component import Component


class Backbone(Component, nn.Module, ABC):
    """Feature extractor for dense prediction and pooling heads.

    Contract:
      * input: ``images`` float tensor (B, 3, H, W), normalised as the backbone expects
        (ImageNet mean/std for timm and PVTv2 weights); H and W multiples of the largest stride
        are always accepted.
      * output: ``list[Tensor]`` of length ``len(self.channels)``, the i-th of shape
        (B, channels[i], H / strides[i], W / strides[i]) (rounded up for odd sizes), same dtype
        and device as the input, ordered from high to low resolution.
      * ``channels`` and ``strides`` are fixed once built.
    """

    kind = "backbone"

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        nn.Module.__init__(self)
        self._init_config(config, overrides)

    @property
    @abstractmethod
    def channels(self) -> list[int]:
        """Channels of each returned feature map."""

    @property
    @abstractmethod
    def strides(self) -> list[int]:
        """Downsampling factor of each returned feature map relative to the input."""

    @abstractmethod
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]: ...
