"""Example foveal plugin: Gradient x Input (Shrikumar et al., 2016; "Learning Important Features
Through Propagating Activation Differences", section 2).

The saliency of pixel (h, w) is ``sum_c |x_chw * d score / d x_chw|`` (``absolute=True``, the
default) or the signed sum clipped at zero.
"""

from __future__ import annotations

import torch
from pydantic import Field

from foveal.core import ComponentConfig, Explainer, target_scores
from foveal.registry import hookimpl


class GradientXInput(Explainer):
    """Gradient x input saliency (Shrikumar et al., 2016, section 2)."""

    class Config(ComponentConfig):
        absolute: bool = Field(True, description="Sum |x * grad| over channels (else the signed sum, clipped at 0).")

    def attribute(self, model, images, targets, hooks):
        x = images.detach().requires_grad_(True)
        scores = target_scores(model(x), targets)
        (grad,) = torch.autograd.grad(scores.sum(), x)
        contrib = x.detach() * grad
        return contrib.abs().sum(1) if self.config.absolute else contrib.sum(1).clamp_min(0)


@hookimpl
def register_components(register):
    register("gradient-x-input", GradientXInput, aliases=("input-x-gradient",))
