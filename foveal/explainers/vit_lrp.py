"""``vit-lrp``: Chefer et al.'s transformer attribution (CVPR 2021) on the relevance machinery of
:mod:`foveal.explainers.relevance`; vit-lrp-affinitynet.txt sections 4.1-4.2, 5.2."""

from __future__ import annotations

import torch
from pydantic import Field

from .relevance import ViTExplainer, rollout, start_layer

Tensor = torch.Tensor


class TransformerAttribution(ViTExplainer):
    """Chefer et al. (CVPR 2021) transformer attribution (``vit-lrp-affinitynet.txt`` section 4.2,
    column "Target paper" of Tables 2 and 3): LRP relevance of every block's attention (alpha1-
    beta0 linears, normalised z-rule for additions and products, identity for norms/activations/
    softmax) times its gradient, positive part averaged over heads, rolled out with the identity
    from ``start_layer`` (default 1, 0 for a one-block model: the authors' Table 2/3 runs call
    ``generate_LRP(..., start_layer=1)`` in ``baselines/ViT/generate_visualizations.py`` and
    ``imagenet_seg_eval.py``; their ``relprop`` default of 0 is not what the tables use); the
    class-token row over the patches is the map. See the module docstring of
    :mod:`foveal.explainers.relevance` for the generic rule installation and the fidelity check
    against the authors' code."""

    need_grads = need_relevance = True

    class Config(ViTExplainer.Config):
        start_layer: int | None = Field(
            None, ge=0, description="First block of the rollout; None = 1, as in the authors' Table 2/3 "
            "evaluation scripts (0 for a one-block model); 0 rolls out every block.")
        eps: float = Field(1e-9, ge=0, description="Stabiliser of LRP denominators (authors' safe_divide).")
        alpha: float = Field(1.0, ge=1, description="alpha of the alpha-beta rule of linear layers "
                             "(beta = alpha - 1); the paper uses 1.")

    def attribute(self, model, images, targets, hooks):
        t = self.trace(model, images, targets, hooks)
        cams = [(g * r).clamp(min=0).mean(dim=1) for g, r in zip(t.grads, t.relevance)]
        return t.to_map(rollout(cams, start_layer(self.config.start_layer, len(cams)), normalize=False)[:, 0])
