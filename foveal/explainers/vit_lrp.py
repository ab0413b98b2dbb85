"""``vit-lrp``: Chefer et al.'s transformer attribution (CVPR 2021) on the relevance machinery of
:mod:`foveal.explainers.relevance`; vit-lrp-affinitynet.txt sections 4.1-4.2, 5.2."""

from __future__ import annotations

import torch
from pydantic import Field

from .relevance import ViTExplainer, rollout

Tensor = torch.Tensor


class TransformerAttribution(ViTExplainer):
    """Chefer et al. (CVPR 2021) transformer attribution (``vit-lrp-affinitynet.txt`` section 4.2,
    column "Target paper" of Tables 2 and 3): LRP relevance of every block's attention (alpha1-
    beta0 linears, normalised z-rule for additions and products, identity for norms/activations/
    softmax) times its gradient, positive part averaged over heads, rolled out with the identity
    from ``start_layer``; the class-token row over the patches is the map. See the module
    docstring for the generic rule installation and the fidelity check against the authors'
    code."""

    need_grads = need_relevance = True

    class Config(ViTExplainer.Config):
        start_layer: int = Field(0, ge=0, description="First block of the rollout (0 in the paper).")
        eps: float = Field(1e-9, ge=0, description="Stabiliser of LRP denominators (authors' safe_divide).")
        alpha: float = Field(1.0, ge=1, description="alpha of the alpha-beta rule of linear layers "
                             "(beta = alpha - 1); the paper uses 1.")

    def attribute(self, model, images, targets, hooks):
        t = self.trace(model, images, targets, hooks)
        cams = [(g * r).clamp(min=0).mean(dim=1) for g, r in zip(t.grads, t.relevance)]
        return t.to_map(rollout(cams, self.config.start_layer, normalize=False)[:, 0])
