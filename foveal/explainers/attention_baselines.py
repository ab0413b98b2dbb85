"""The attention baselines of Chefer et al.'s Tables 2-3 (vit-lrp-affinitynet.txt section 5.2):
attention rollout, raw attention, Grad-CAM on the last attention map and partial LRP."""

from __future__ import annotations

import torch
from pydantic import Field

from ..core.errors import InputError
from .relevance import ViTExplainer, rollout, start_layer

Tensor = torch.Tensor


class AttentionRollout(ViTExplainer):
    """Attention rollout (Abnar & Zuidema, ACL 2020), column "rollout" of Tables 2/3: head-mean
    attention plus identity, rows normalised, multiplied from ``start_layer`` (default 1, 0 for a
    one-block model: the authors' evaluation scripts call ``generate_rollout(data,
    start_layer=1)`` in ``baselines/ViT/generate_visualizations.py`` and ``imagenet_seg_eval.py``);
    class row. Class-agnostic (``targets`` are checked, then ignored)."""

    class Config(ViTExplainer.Config):
        start_layer: int | None = Field(
            None, ge=0, description="First block of the rollout; None = 1, as in the authors' Table 2/3 "
            "evaluation scripts (0 for a one-block model); 0 rolls out every block.")

    def attribute(self, model, images, targets, hooks):
        t = self.trace(model, images, targets, hooks)
        layers = [a.mean(dim=1) for a in t.attention]
        return t.to_map(rollout(layers, start_layer(self.config.start_layer, len(layers)), normalize=True)[:, 0])


class LastBlockExplainer(ViTExplainer):
    class Config(ViTExplainer.Config):
        layer: int = Field(-1, description="Block whose attention is used (-1 = last, as in the paper).")

    def pick(self, layers: list[Tensor]) -> Tensor:
        i = self.config.layer
        if not -len(layers) <= i < len(layers):
            raise InputError(f"layer={i} out of range for a model with {len(layers)} blocks")
        return layers[i]


class RawAttention(LastBlockExplainer):
    """Raw attention (column "raw attention" of Tables 2/3): the last block's attention
    probabilities averaged over heads, class-token row. Class-agnostic."""

    def attribute(self, model, images, targets, hooks):
        t = self.trace(model, images, targets, hooks)
        return t.to_map(self.pick(t.attention).mean(dim=1)[:, 0])


class AttentionGradCAM(LastBlockExplainer):
    """Grad-CAM on the last block's attention (column "GradCAM" of Tables 2/3, the authors'
    ``generate_cam_attn``): class-row attention of each head times that head's class-row
    gradient averaged over the patch tokens, mean over heads, positive part."""

    need_grads = True

    def attribute(self, model, images, targets, hooks):
        t = self.trace(model, images, targets, hooks)
        attn = self.pick(t.attention)[:, :, 0, t.prefix:]
        grad = self.pick(t.grads)[:, :, 0, t.prefix:]
        cam = (attn * grad.mean(dim=-1, keepdim=True)).mean(dim=1).clamp(min=0)
        return cam.reshape(cam.shape[0], *t.grid)


class PartialLRP(LastBlockExplainer):
    """Partial LRP (Voita et al., ACL 2019; column "partial LRP" of Tables 2/3): the last block's
    attention relevance, positive part averaged over heads, class-token row. The relevance is
    propagated with the original LRP rules, as the authors' evaluation runs it
    (``orig_lrp.generate_LRP(..., method="last_layer")`` on ``baselines/ViT/ViT_orig_LRP.py``,
    which imports ``modules/layers_lrp.py``): plain z-rule for additions (no normalisation),
    alpha-beta with the positive-input and negative-input terms normalised separately, products
    halved, identity for norms and softmax (rule set ``orig-lrp``), not Chefer's own rules."""

    need_relevance = True
    rules = "orig-lrp"

    class Config(LastBlockExplainer.Config):
        eps: float = Field(1e-9, ge=0, description="Stabiliser of LRP denominators (authors' safe_divide).")
        alpha: float = Field(1.0, ge=1, description="alpha of the alpha-beta rule (beta = alpha - 1); "
                             "the authors' scripts use 1.")

    def attribute(self, model, images, targets, hooks):
        t = self.trace(model, images, targets, hooks)
        return t.to_map(self.pick(t.relevance).clamp(min=0).mean(dim=1)[:, 0])
