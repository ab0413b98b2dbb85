"""Pooling components: global average pooling (and attention poolings)."""

from __future__ import annotations

import torch
from pydantic import Field

from ..core.config import ComponentConfig
from ..core.errors import InputError
from ..core.pooling import Pooling
from ..registry import hookimpl


class GlobalAveragePooling(Pooling):
    """Global average pooling (Lin et al., "Network in Network", 2014): the mean over positions
    of the last feature map, the pooling CA-Stream replaces (ca-stream.txt, section 3.1)."""

    class Config(ComponentConfig):
        in_channels: int = Field(2048, gt=0, description="Channels C of the input feature map.")

    @property
    def out_features(self) -> int:
        return self.config.in_channels

    def forward(self, features: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        x = features[-1] if isinstance(features, (list, tuple)) else features
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise InputError(
                f"gap: expected features (B, {self.config.in_channels}, h, w), got shape {tuple(x.shape)}"
            )
        return x.mean(dim=(2, 3))


@hookimpl
def register_components(register):
    register("gap", GlobalAveragePooling, aliases=("global-average-pooling",))
