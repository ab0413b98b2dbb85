"""Refiner interface: images + seed maps -> refined maps or labels."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from .component import Component


class Refiner(Component, nn.Module, ABC):
    """Turns coarse seeds (e.g. explanation maps) into refined maps.

    Contract of :meth:`refine`:
      * ``images``: float (B, 3, H, W), normalised like the refiner's backbone expects;
      * ``seeds``: float (B, K, H, W) class score maps in [0, 1] (K foreground classes; the
        background is derived by the refiner) or (B, H, W) for a single class;
      * returns float (B, K + 1, H, W) refined class probabilities (channel 0 = background);
        ``labels = refined.argmax(1)`` gives the pseudo-mask.
    """

    kind = "refiner"

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        nn.Module.__init__(self)
        self._init_config(config, overrides)

    @abstractmethod
    def refine(self, images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor: ...
