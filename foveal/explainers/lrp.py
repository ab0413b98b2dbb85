"""``lrp``: layer-wise relevance propagation to the pixels of any model made of torch operations
with a rule (timm ViT / DeiT, PVTv2, Swin, CNNs, and segmenters such as RTA-Former), without
rewriting the model.

The rules are those of :mod:`foveal.explainers.relevance`, applied from the image on: the tracer
marks the input, every torch call computed from it is replaced by a custom autograd function
whose backward, in ``lrp`` mode, carries relevance. ``rules`` names the rule set (the table is in
``docs/lrp.md``):

* ``attnlrp`` (default): Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance
  Propagation for Transformers", ICML 2024: epsilon rule for linear maps and convolutions (eq. 8),
  Proposition 3.1 for softmax, epsilon + uniform for products (Propositions 3.2-3.3), identity
  for elementwise activations and for the standard deviation of norms (Proposition 3.4);
  checked against LXT's own functions (``tests/test_lrp.py``).
* ``cp-lrp``: the same, with the attention probabilities held constant (Ali et al., "XAI for
  Transformers: Better Explanations through Conservative Propagation", ICML 2022), what LXT runs
  for vision transformers.
* ``chefer``: Chefer et al.'s rules (CVPR 2021; ``vit-lrp``), generalised beyond ViT: alpha-beta for
  every linear map and convolution, normalised z-rule for additions, halved z-rule for products,
  identity for norms / softmax / activations, z^B for the layer reading the image.
* ``orig-lrp``: the original LRP rules of Chefer et al.'s baselines (``partial-lrp``; the "LRP"
  column of vit-lrp-affinitynet.txt Tables 2-3 is this rule set on a ViT).

Relevance starts at the model output as ``R_out = output * d score / d output``: for the targets
of :func:`foveal.core.target_scores` (a class logit, or :class:`SegmentationTarget`'s sum of a
class's logits over a region) this is the target score split over the output entries it sums, so
``sum R_out = score``. The map is the input relevance summed over the colour channels
(relevance is additive; Chefer et al.'s "full" LRP and LXT's examples do the same), signed by
default (``sign="positive"`` keeps the evidence for the target, ``"absolute"`` its magnitude).

Conservation (``sum R_input = score``) holds exactly, up to the stabiliser, for ``chefer`` and
``cp-lrp`` on a model whose biases, norm shifts and other added constants are zero and that
concatenates no constant token (a class token takes its share with it); ``attnlrp`` also loses
the softmax's Taylor remainder (Proposition 3.1 is conservative only with the bias term), and
``orig-lrp``'s separately normalised alpha-beta rule is not conservative at all (each sign's
share sums to the incoming relevance). ``tests/test_lrp.py`` checks all four statements.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..core.config import ComponentConfig
from ..core.errors import InputError
from ..core.explainer import Explainer, target_scores
from .relevance import RULE_SETS, _State, require_autograd, rule_set, traced

Tensor = torch.Tensor


class LRP(Explainer):
    """Layer-wise relevance propagation to the input pixels for any model (ViT, PVTv2, Swin, CNNs,
    RTA-Former; classification or :class:`SegmentationTarget`), with the rule set ``rules``:
    ``attnlrp`` (Achtibat et al., ICML 2024), ``cp-lrp`` (Ali et al., ICML 2022), ``chefer``
    (Chefer et al., CVPR 2021, generalised) or ``orig-lrp`` (their LRP baseline). The map is the
    input relevance summed over channels. See the module docstring and ``docs/lrp.md``."""

    class Config(ComponentConfig):
        rules: Literal["attnlrp", "cp-lrp", "chefer", "orig-lrp"] = Field(
            "attnlrp", description="Rule set: attnlrp (Achtibat et al. 2024), cp-lrp (attention as constant "
            "weights, Ali et al. 2022), chefer (Chefer et al. 2021, as vit-lrp), orig-lrp (their LRP baseline).")
        eps: float | None = Field(
            None, ge=0, description="Stabiliser of the denominators, z + eps; None = the rule set's "
            "(1e-6 for attnlrp / cp-lrp as LXT's linear layers, 1e-9 for chefer / orig-lrp as the "
            "authors' safe_divide).")
        alpha: float = Field(1.0, ge=1, description="alpha of the alpha-beta rule (beta = alpha - 1) of "
                             "chefer / orig-lrp; unused by the epsilon rule sets.")
        sign: Literal["signed", "positive", "absolute"] = Field(
            "signed", description="Map from the channel-summed relevance: signed (as LXT and the authors' "
            "full LRP), its positive part, or its absolute value.")

    def relevance(self, model: torch.nn.Module, images: Tensor, targets=None, hooks: list | None = None) -> Tensor:
        """Input relevance (B, C, H, W), signed, before any channel sum. Runs on the model as it
        is (call it inside :func:`foveal.core.modules.preserved_model_state` with the model in
        eval mode, as :meth:`explain` does)."""
        cfg = self.config
        name = self.registry_name or "lrp"
        require_autograd(name, images)
        rules = rule_set(cfg.rules)
        state = _State(rules.eps if cfg.eps is None else cfg.eps, cfg.alpha, rules)
        hooks = [] if hooks is None else hooks
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)
            with traced(model, hooks, state, lrp=True, name=name) as tracer:
                tracer.mark(x, image=True)
                output = model(x)
            if not isinstance(output, Tensor) or not tracer.is_act(output):
                raise InputError(
                    f"{name}: the model output must be a tensor computed from the images by traced torch "
                    f"operations, got {type(output).__name__}"
                )
            scores = target_scores(output, targets)
            state.mode = "grad"
            (seed,) = torch.autograd.grad(scores.sum(), output, retain_graph=True)
            state.mode = "lrp"
            (r,) = torch.autograd.grad(output, x, seed * output.detach())
        return r.detach()

    def attribute(self, model, images, targets, hooks):
        r = self.relevance(model, images, targets, hooks).sum(1)
        if self.config.sign == "positive":
            return r.clamp(min=0)
        if self.config.sign == "absolute":
            return r.abs()
        return r


__all__ = ["LRP", "RULE_SETS"]
