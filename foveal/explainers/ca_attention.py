"""``ca-attention``: the raw cross-attention of CA-Stream's last block as a saliency map
(ca-stream.txt section 3.2, Figure 2)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from ..core.config import ComponentConfig
from ..core.errors import InputError
from ..core.explainer import Explainer, target_scores
from ..models.ca_stream import CaStream


class CaAttention(Explainer):
    """Raw attention of CA-Stream (ca-stream.txt, section 3.2, eq. 5 and Figure 2): the last
    cross-attention block's pre-softmax logits ``F_L q_L / sqrt(d_L)`` over the last stage's
    grid, a class-agnostic CAM-like saliency map (``targets`` are checked, then ignored). Works on any model
    containing a ``ca-stream`` pooling; one forward pass, no gradients."""

    class Config(ComponentConfig):
        softmax: bool = Field(False, description="Return the attention weights softmax(logits) instead of the logits.")

    def attribute(self, model: nn.Module, images: torch.Tensor, targets: Any, hooks: list) -> torch.Tensor:
        pools = [m for m in model.modules() if isinstance(m, CaStream)]
        if not pools:
            raise InputError(f"ca-attention: {type(model).__name__} has no ca-stream pooling")
        pool = pools[-1]
        pool.last_attention = None
        with torch.no_grad():
            target_scores(model(images), targets)  # ignored, but checked like every explainer's
        att = pool.last_attention
        if att is None:
            raise InputError("ca-attention: the model's forward did not run its ca-stream pooling")
        if self.config.softmax:
            att = att.flatten(1).softmax(1).view_as(att)
        return att.float()
