"""Relevance propagation through any model built from torch operations, and the ViT explainers
built on it: Chefer et al.'s transformer attribution and the attention baselines it is compared to.

Chefer, Gur and Wolf, "Transformer Interpretability Beyond Attention Visualization" (CVPR 2021),
as replicated in ``vit-lrp-affinitynet.txt`` (sections 4.1, 4.2, 5.2; Tables 2 and 3); Achtibat et
al., "AttnLRP" (ICML 2024) for the ``attnlrp`` / ``cp-lrp`` rule sets used by ``lrp``
(:mod:`foveal.explainers.lrp`, ``docs/lrp.md``).

ViT explainers (timm ``vit_*``, DeiT, the hybrid R50+ViT ``vit_base_r50_s16_*`` and any model with
a ``blocks`` container of attention blocks):

* ``vit-lrp``: the paper's method. Relevance propagation (section 4.2, rule set ``chefer``) with
  LRP alpha1-beta0 for linear layers, the z-rule with the two-input normalisation for additions
  and matrix products, identity for norms, activations and softmax; per block the attention
  relevance ``R_b`` and the attention gradient ``G_b`` give ``mean_heads((G_b * R_b)^+)``; these
  are rolled out with the identity from ``start_layer`` (default 1, as the authors' Table 2/3
  scripts; no row normalisation, as in their code) and the class-token row over the patch tokens
  is the map.
* ``attention-rollout`` (Abnar & Zuidema 2020, column "rollout" of Tables 2/3): head-averaged
  attention plus identity, row-normalised, multiplied over the blocks from ``start_layer``
  (default 1, as the authors' scripts).
* ``raw-attention`` (column "raw attention"): the last block's head-averaged attention,
  class row (alias ``vit-raw-attention``).
* ``attn-grad-cam`` (column "GradCAM"): the last block's class-row attention per head weighted by
  that head's mean attention gradient, averaged over heads, positive part.
* ``partial-lrp`` (Voita et al. 2019, column "partial LRP"): the last block's attention
  relevance under the original LRP rules (rule set ``orig-lrp``, the authors' ``ViT_orig_LRP``),
  positive part averaged over heads, class row.

How the rules reach the model without rewriting it
--------------------------------------------------
During the explainer's forward pass a :class:`torch.overrides.TorchFunctionMode` sees every torch
call. A starting tensor is marked (the first block's input for the ViT explainers, the image for
``lrp``) and marks spread to every tensor computed from it. Calls on marked tensors are replaced
by custom autograd functions with two backward modes sharing one forward graph:

* ``grad``: the exact gradient (used for the attention gradients ``G_b`` and the seed);
* ``lrp``: the relevance rule of the :class:`RuleSet` (``RULE_SETS``: ``chefer``, ``orig-lrp``,
  ``attnlrp``, ``cp-lrp``; the table is in :class:`RuleSet` and ``docs/lrp.md``), with relevance
  (not relevance / activation) carried in the backward slot as in the authors' ``relprop``:

  - ``F.linear``, convolutions (and ``x @ W`` with a constant 2-D ``W``): alpha-beta (Chefer:
    ``R_x = x+ . (S W+) + x- . (S W-)``, ``S = R / (x+ W+^T + x- W-^T)``; original: each term
    normalised by its own sum) or epsilon (``x . W^T (R / (W x + b + eps))``); z^B for the layer
    reading the image under Chefer's rule sets;
  - addition of two tensors (the residual connections): z-rule ``R_a = a . R / (a + b)``, then for
    ``chefer`` the two-input normalisation of section 4.2 (each share rescaled so that
    ``|sum R_a| : |sum R_b|`` is kept and the total equals ``sum R``), sums taken **per sample**
    so a batch is explained exactly like its images one by one; an added constant tensor takes its
    share away;
  - product of two marked tensors (``q @ k^T``, ``attn @ v``, einsum, elementwise gates):
    z-rule on both operands, each halved -- the normalisation of section 4.2 reduces to this
    because both operand relevances sum to ``sum R`` (the authors' code divides by 2), and it is
    AttnLRP's epsilon-then-uniform rule;
  - softmax: identity (Chefer), Proposition 3.1 (AttnLRP) or constant (CP-LRP);
  - norms (LayerNorm, GroupNorm, RMSNorm): identity, or the std held constant (AttnLRP);
    BatchNorm: identity or epsilon; elementwise activations, multiplication or division by a
    constant (``q * scale``, LayerScale): identity, ``R_x = R_y``;
  - index selection (``x[:, 0]``, the class-token pooling): z-rule, ``R * y / (y + eps)``;
    interpolation, pooling, means and sums: z-rule ``x . J^T (R / (y + eps))``;
  - reshapes, views, concatenation, eval-mode dropout: their gradient, which moves relevance
    without changing it. Any other op on marked tensors keeps its gradient and is reported once
    with a warning.

Denominators are stabilised like the authors' ``safe_divide``: ``a / (b + eps)`` with
``eps = 1e-9`` (Chefer's rule sets) and 0 where ``b == 0``.

No graph outlives a call: nothing that a ``grad_fn`` reaches holds a tensor of the graph except
through ``save_for_backward`` (the fork bookkeeping of :class:`_Node` is a counter; outputs are
saved, not stored), so every explain frees its graph (issue 17: it leaked about 10 MB per call).

timm's fused attention (``F.scaled_dot_product_attention``) hides the attention matrix, so every
module's ``fused_attn`` flag is switched off for the call and restored afterwards (also on
errors); hooks are appended to ``hooks`` and removed by :meth:`Explainer.explain`.

Decisions where the sources differ
----------------------------------
* The authors' code sums the addition relevances over the whole batch (it is only ever run with
  one image); we sum per sample, so a batch gives exactly the maps of its images one by one.
* The stabiliser is not a detail at 1e-6: over 12 blocks the ``eps`` placements change maps by
  up to 3e-3 relative. They are reproduced: at a fork (a tensor consumed twice, the residual
  stream; views of it count as the tensor) the summed relevance gets ``y / (y + eps)`` (the
  authors' ``Clone``), the class-token selection is a z-rule (their ``IndexSelect``), and a
  product whose operand was just scaled by a constant (timm's ``q * scale @ k^T``) scales ``eps``
  with it, giving the relevance of ``(q @ k^T) * scale`` (their model). With ``eps = 0`` every
  variant agrees anyway.
* ``start_layer`` defaults to 1 for ``vit-lrp`` and ``attention-rollout``: the authors' Table 2/3
  runs call ``generate_LRP(..., start_layer=1)`` and ``generate_rollout(..., start_layer=1)``
  (``baselines/ViT/generate_visualizations.py``, ``imagenet_seg_eval.py``), although their
  ``relprop`` and ``generate_rollout`` default to 0.
* ``partial-lrp`` runs on the original LRP rules: the authors compute it with
  ``orig_lrp.generate_LRP(method="last_layer")`` on ``ViT_orig_LRP`` (``modules/layers_lrp.py``),
  not on their own rules.

Fidelity check against the authors' code (out of band, not part of the package or its tests):
the public ``hila-chefer/Transformer-Explainability`` code (``baselines/ViT/ViT_LRP.py``,
``ViT_orig_LRP.py``, ``modules/layers_ours.py``, ``layers_lrp.py``, commit c3e578f) was run on CPU
in float64 with the weights of randomly initialised timm ViTs (``vit_base_patch16_224`` full size
and ``vit_tiny_patch16_224``, biases and norm parameters perturbed; ``load_state_dict`` strict, its
final LayerNorm eps set to timm's 1e-6), ``relprop(one_hot, method="transformer_attribution",
start_layer=s, alpha=1)`` after ``one_hot . output`` was back-propagated. Our maps on the same timm
model and image differ by at most 2.3e-15 relative (max |ours - ref| / max |ref|, also
elementwise), for start_layer 0 and 5; ``raw-attention`` ("last_layer_attn"),
``attention-rollout`` (``generate_rollout``) and ``attn-grad-cam`` (``generate_cam_attn``) agree
to 6e-16; ``partial-lrp`` equals ``ViT_orig_LRP``'s ``method="last_layer"`` to 2e-11 (12 blocks)
and 5e-14 (4 blocks), and ``lrp`` with ``chefer`` / ``orig-lrp`` their ``method="full"`` to 2e-9.
The scripts and how to run them are in ``docs/wsss.md``. The test suite keeps independent
float64 re-derivations on a tiny ViT (``tests/test_vit_lrp.py``).
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.config import ComponentConfig
from ..core.errors import InputError
from ..core.explainer import Explainer, Targets, target_scores
from ..core.modules import resolve_layer
from .tokens import token_grid

Tensor = torch.Tensor

# --- rule sets ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RuleSet:
    """Which relevance rule each kind of operation gets (the table in ``docs/lrp.md``).

    * ``linear``: ``F.linear`` / convolutions / ``x @ W`` with constant weights: ``"alpha-beta"``
      (one normaliser ``z+ = x+ W+ + x- W-``, Chefer's ``layers_ours.Linear``),
      ``"alpha-beta-separate"`` (one normaliser per sign, ``x+ W+`` and ``x- W-``: the original
      rule of Chefer's ``layers_lrp.Linear``), ``"epsilon"`` (``z = W x + b``: the bias absorbs its
      share; Achtibat et al. eq. 8).
    * ``input_layer``: the linear map or convolution that reads the image itself: ``"zb"`` (the
      z^B rule with the per-image minimum and maximum as bounds, Chefer's ``Conv2d`` on 3-channel
      input) or ``"same"`` (the ``linear`` rule).
    * ``add``: sum of two activations (residuals) and of an activation and a constant tensor
      (position embeddings, attention biases; the constant's share is dropped): ``"z-normalised"``
      (z-rule, then the two shares rescaled to keep ``|sum R_a| : |sum R_b|`` and the total, section
      4.2) or ``"z"`` (plain z / epsilon rule).
    * ``scalar_shift``: ``x + c`` for a Python number ``c`` (``1 - sigmoid(x)``): ``"identity"`` or
      ``"z"`` (the number is a bias, as every constant in AttnLRP).
    * ``softmax``: ``"identity"`` (Chefer), ``"taylor"`` (``R_x = x (R - s sum R)``: Achtibat et al.
      Proposition 3.1) or ``"constant"`` (the probabilities are treated as constant weights; no
      relevance reaches the logits: CP-LRP, Ali et al. 2022, LXT's recommendation for ViTs).
    * ``norm``: LayerNorm / GroupNorm / RMSNorm: ``"identity"`` or ``"centred"`` (the standard
      deviation held constant, the centring and the affine part by the epsilon rule: Achtibat et
      al. Proposition 3.4 and LXT's ``layer_norm_grad_fn``).
    * ``batch_norm`` (eval, running statistics): ``"identity"`` (Chefer's ``BatchNorm2d`` relprop
      reduces to it) or ``"epsilon"`` (the affine map ``a x + b`` by the epsilon rule: identical to
      folding it into the convolution before).
    * ``forks``: a tensor consumed more than once gets ``y / (y + eps)`` on its summed relevance
      (Chefer's ``Clone``); without it the relevances are simply summed.

    Products of two activations (``q @ k^T``, ``attn @ v``, gates) get the z-rule halved on both
    operands in every set: Chefer's model divides by two, Achtibat et al. Proposition 3.3 (epsilon
    then uniform); for an elementwise product it is their uniform rule (Proposition 3.2) up to the
    stabiliser. Elementwise activations and scaling by constants get the identity rule, linear
    maps without weights (interpolation, pooling, means, sums) the z-rule, reshapes and
    concatenations their gradient, in every set."""

    name: str
    linear: str
    input_layer: str
    add: str
    scalar_shift: str
    softmax: str
    norm: str
    batch_norm: str
    forks: bool
    eps: float
    cite: str


RULE_SETS: dict[str, RuleSet] = {
    "chefer": RuleSet(
        "chefer", linear="alpha-beta", input_layer="zb", add="z-normalised", scalar_shift="identity",
        softmax="identity", norm="identity", batch_norm="identity", forks=True, eps=1e-9,
        cite="Chefer, Gur & Wolf, CVPR 2021, sec. 3 and their modules/layers_ours.py; "
             "vit-lrp-affinitynet.txt sec. 4.2"),
    "orig-lrp": RuleSet(
        "orig-lrp", linear="alpha-beta-separate", input_layer="zb", add="z", scalar_shift="identity",
        softmax="identity", norm="identity", batch_norm="identity", forks=True, eps=1e-9,
        cite="the original LRP rules of Chefer et al.'s baselines (modules/layers_lrp.py, "
             "baselines/ViT/ViT_orig_LRP.py): columns 'LRP' and 'partial LRP' of Tables 2-3"),
    "attnlrp": RuleSet(
        "attnlrp", linear="epsilon", input_layer="same", add="z", scalar_shift="z",
        softmax="taylor", norm="centred", batch_norm="epsilon", forks=False, eps=1e-6,
        cite="Achtibat et al., AttnLRP, ICML 2024: eq. 8 (epsilon), Prop. 3.1 (softmax), "
             "3.2-3.3 (products), 3.4 (norms); LXT lxt/explicit/functional.py"),
    "cp-lrp": RuleSet(
        "cp-lrp", linear="epsilon", input_layer="same", add="z", scalar_shift="z",
        softmax="constant", norm="centred", batch_norm="epsilon", forks=False, eps=1e-6,
        cite="Ali et al., ICML 2022 (attention as constant weights) with AttnLRP's other rules, "
             "as LXT's efficient mode does for vision transformers (lxt/efficient/patches.py)"),
}


def rule_set(name: str) -> RuleSet:
    try:
        return RULE_SETS[name]
    except KeyError:
        raise InputError(f"rules: unknown rule set {name!r}; expected one of {sorted(RULE_SETS)}") from None


# --- relevance rules as autograd functions ---------------------------------------------------

class _State:
    """Backward mode shared by the functions of one graph (``"grad"`` or ``"lrp"``), the rule set,
    the stabiliser and alpha."""

    def __init__(self, eps: float, alpha: float, rules: RuleSet | str = "chefer") -> None:
        self.mode = "grad"
        self.eps = eps
        self.alpha = alpha
        self.rules = rule_set(rules) if isinstance(rules, str) else rules


class _Node:
    """Bookkeeping of one replaced call's output: how many traced calls consumed it (a fork when
    more than one). It holds no tensor: the output itself is saved with ``save_for_backward``
    (autograd keeps saved outputs without a reference cycle; a tensor stored on the node or the
    ctx would form the cycle output -> grad_fn -> ctx -> node -> output, which the garbage
    collector cannot free because part of it lives in C++: issue 17, one graph leaked per call)."""

    __slots__ = ("uses",)

    def __init__(self) -> None:
        self.uses = 0


def _stable_div(num: Tensor, den: Tensor, eps: float) -> Tensor:
    """``num / (den + eps)``, 0 where ``den == 0`` (the reference's ``safe_divide``)."""
    shifted = den + eps
    shifted.masked_fill_(shifted == 0, eps if eps else 1.0)
    return (num / shifted).masked_fill_(den == 0, 0)


def _arriving(ctx, r: Tensor) -> Tensor:
    """Relevance arriving at a replaced call's output (saved last by every function). At a fork
    the summed relevance of the consumers gets the z-rule factor ``y / (y + eps)`` of the
    authors' ``Clone`` relprop (rule sets with ``forks``)."""
    node, st = ctx.node, ctx.state
    if st.mode == "lrp" and st.rules.forks and node is not None and node.uses > 1:
        out = ctx.saved_tensors[-1]
        return r * _stable_div(out, out, st.eps)
    return r


def _sample_sum(t: Tensor) -> Tensor:
    """Sum over every dim but the first, kept broadcastable: (B, 1, ..., 1)."""
    return t.reshape(t.shape[0], -1).sum(1).reshape(t.shape[0], *([1] * (t.dim() - 1)))


class _Op:
    """A linear map of the input with a weight: ``fwd(x, w)`` (no bias) and ``vjp(s, w)`` (the
    transposed map). ``F.linear`` and the convolutions; the vjp needs no recomputation."""

    def __init__(self, kind: str, x_shape: torch.Size, stride=1, padding=0, dilation=1, groups=1) -> None:
        self.kind, self.x_shape = kind, x_shape
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def fwd(self, x: Tensor, w: Tensor) -> Tensor:
        if self.kind == "linear":
            return F.linear(x, w)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
        return conv(x, w, None, self.stride, self.padding, self.dilation, self.groups)

    def vjp(self, s: Tensor, w: Tensor) -> Tensor:
        if self.kind == "linear":
            return s.matmul(w)
        if isinstance(self.padding, str):  # "same"/"valid": let autograd find the padding
            with torch.enable_grad():
                xx = torch.zeros(self.x_shape, dtype=s.dtype, device=s.device, requires_grad=True)
                return torch.autograd.grad(self.fwd(xx, w), xx, s)[0]
        n = w.dim() - 2

        def tup(v):
            return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n

        x = s.new_empty(1).expand(self.x_shape)
        return torch.ops.aten.convolution_backward(
            s, x, w, None, tup(self.stride), tup(self.padding), tup(self.dilation), False, [0] * n,
            self.groups, (True, False, False))[0]


def _alpha_beta(op: _Op, x: Tensor, weight: Tensor, r: Tensor, alpha: float, eps: float,
                separate: bool = False) -> Tensor:
    """LRP alpha-beta rule of a linear map (bias excluded), beta = alpha - 1. ``separate``: the
    positive-input and negative-input contributions are normalised apart (``layers_lrp``), else
    by their sum (``layers_ours``)."""
    px = x.clamp(min=0)
    nx = x - px
    pw = weight.clamp(min=0)
    nw = weight - pw

    def share(w1: Tensor, w2: Tensor) -> Tensor:
        z1, z2 = op.fwd(px, w1), op.fwd(nx, w2)
        if separate:
            return px * op.vjp(_stable_div(r, z1, eps), w1) + nx * op.vjp(_stable_div(r, z2, eps), w2)
        s = _stable_div(r, z1 + z2, eps)
        return px * op.vjp(s, w1) + nx * op.vjp(s, w2)

    out = share(pw, nw)
    if alpha != 1:
        out = alpha * out - (alpha - 1) * share(nw, pw)
    return out


def _z_beta(op: _Op, x: Tensor, weight: Tensor, r: Tensor, eps: float) -> Tensor:
    """z^B rule for the layer reading the image (Montavon et al. 2017), bounds ``L``/``H`` = the
    per-image minimum/maximum of the input, as Chefer's ``Conv2d.relprop`` on 3-channel input."""
    dims = tuple(range(1, x.dim()))
    low = x.amin(dim=dims, keepdim=True).expand_as(x)
    high = x.amax(dim=dims, keepdim=True).expand_as(x)
    pw = weight.clamp(min=0)
    nw = weight - pw
    z = op.fwd(x, weight) - op.fwd(low, pw) - op.fwd(high, nw)
    s = _stable_div(r, z, eps)
    return x * op.vjp(s, weight) - low * op.vjp(s, pw) - high * op.vjp(s, nw)


class _Affine(torch.autograd.Function):
    """``F.linear`` / convolution with constant weight and bias: the rule set's ``linear`` rule
    (or its ``input_layer`` rule when ``x`` is the image)."""

    @staticmethod
    def forward(ctx, x, weight, bias, op, is_input, state, node):
        out = op.fwd(x, weight)
        if bias is not None:
            out = out + (bias if op.kind == "linear" else bias.reshape(-1, *([1] * (out.dim() - 2))))
        ctx.save_for_backward(x, weight, out)
        ctx.op, ctx.is_input, ctx.state, ctx.node = op, is_input, state, node
        return out

    @staticmethod
    def backward(ctx, r):
        x, weight, out = ctx.saved_tensors
        st, op = ctx.state, ctx.op
        none = (None,) * 6
        if st.mode == "grad":
            return (op.vjp(r, weight), *none)
        r = _arriving(ctx, r)
        rule = "zb" if ctx.is_input and st.rules.input_layer == "zb" else st.rules.linear
        if rule == "epsilon":
            return (x * op.vjp(_stable_div(r, out, st.eps), weight), *none)
        if rule == "zb":
            return (_z_beta(op, x, weight, r, st.eps), *none)
        return (_alpha_beta(op, x, weight, r, st.alpha, st.eps, separate=rule == "alpha-beta-separate"), *none)


class _Add(torch.autograd.Function):
    """``a + coef * b``; ``b`` may be a constant tensor (its share of the relevance is dropped).
    The z-rule, then (``add="z-normalised"``) the two-input normalisation of section 4.2."""

    @staticmethod
    def forward(ctx, a, b, coef, state, node):
        out = a + b if coef == 1 else a + coef * b
        ctx.save_for_backward(a, b, out)
        ctx.coef, ctx.state, ctx.node = coef, state, node
        return out

    @staticmethod
    def backward(ctx, r):
        a, b, _ = ctx.saved_tensors
        coef, st = ctx.coef, ctx.state
        if st.mode == "grad":
            ra, rb = r, r * coef
        else:
            r = _arriving(ctx, r)
            bc = b if coef == 1 else coef * b
            s = _stable_div(r, a + bc, st.eps)
            ra, rb = a * s, bc * s
            if st.rules.add == "z-normalised":
                sa, sb, total = _sample_sum(ra), _sample_sum(rb), _sample_sum(r)
                norm = sa.abs() + sb.abs()
                ra = ra * _stable_div(_stable_div(sa.abs(), norm, st.eps) * total, sa, st.eps)
                rb = rb * _stable_div(_stable_div(sb.abs(), norm, st.eps) * total, sb, st.eps)
        ga = ra.sum_to_size(a.shape) if ctx.needs_input_grad[0] else None
        gb = rb.sum_to_size(b.shape) if ctx.needs_input_grad[1] else None
        return ga, gb, None, None, None


class _Bilinear(torch.autograd.Function):
    """Product of two activations ``fn(u, v)`` (matmul, einsum, elementwise): z-rule, halved.
    ``scale`` is the product of constant scalars the operands were multiplied by just before
    (``q * scale @ k^T``); the stabiliser is scaled with them so the relevance is the same as for
    ``(q @ k^T) * scale``, the form of the authors' model."""

    @staticmethod
    def forward(ctx, u, v, fn, scale, state, node):
        out = fn(u, v)
        ctx.save_for_backward(u, v, out)
        ctx.fn, ctx.scale, ctx.state, ctx.node = fn, scale, state, node
        return out

    @staticmethod
    def backward(ctx, r):
        u, v, _ = ctx.saved_tensors
        st = ctx.state
        with torch.enable_grad():
            uu, vv = u.detach().requires_grad_(True), v.detach().requires_grad_(True)
            z = ctx.fn(uu, vv)
            cot = r if st.mode == "grad" else _stable_div(_arriving(ctx, r), z.detach(), st.eps * ctx.scale)
            gu, gv = torch.autograd.grad(z, (uu, vv), cot)
        if st.mode == "lrp":
            gu, gv = u * gu / 2, v * gv / 2
        return gu, gv, None, None, None, None


class _Identity(torch.autograd.Function):
    """Identity rule ``R_x = R_y`` for ``y = fn(x)`` (activations, scaling by constants, and the
    norms / softmax / shifts of the rule sets that give them the identity)."""

    @staticmethod
    def forward(ctx, x, fn, state, node):
        out = fn(x)
        ctx.save_for_backward(x, out)
        ctx.fn, ctx.state, ctx.node = fn, state, node
        return out

    @staticmethod
    def backward(ctx, r):
        x, _ = ctx.saved_tensors
        if ctx.state.mode == "lrp":
            r = _arriving(ctx, r)
            return (r if r.shape == x.shape else r.sum_to_size(x.shape)), None, None, None
        return _vjp(ctx.fn, x, r), None, None, None


def _vjp(fn: Callable, x: Tensor, r: Tensor) -> Tensor:
    with torch.enable_grad():
        xx = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(xx), xx, r)
    return g


class _ZRule(_Identity):
    """A linear map without weights ``y = fn(x)`` (interpolation, pooling, means and sums, a
    matmul with a constant left factor): z-rule ``R_x = x . J^T (R / (y + eps))`` (Chefer's
    ``RelPropSimple``; the epsilon rule of AttnLRP). Same forward as :class:`_Identity`."""

    @staticmethod
    def backward(ctx, r):
        x, out = ctx.saved_tensors
        if ctx.state.mode == "grad":
            return _vjp(ctx.fn, x, r), None, None, None
        s = _stable_div(_arriving(ctx, r), out, ctx.state.eps)
        return x * _vjp(ctx.fn, x, s), None, None, None


class _Select(_Identity):
    """Index selection ``y = x[index]`` (the class-token pooling): z-rule, i.e. the relevance
    times ``y / (y + eps)`` scattered back (the authors' ``IndexSelect`` relprop)."""

    @staticmethod
    def backward(ctx, r):
        x, out = ctx.saved_tensors
        if ctx.state.mode == "lrp":
            r = _arriving(ctx, r) * _stable_div(out, out, ctx.state.eps)
        return _vjp(ctx.fn, x, r), None, None, None


class _Softmax(_Identity):
    """Softmax along ``ctx.dim``: identity (Chefer) or Achtibat et al.'s Proposition 3.1
    ``R_x = x (R - s sum(R))`` (``-inf`` logits, masked positions, count as 0, as in LXT)."""

    @staticmethod
    def backward(ctx, r):
        x, s = ctx.saved_tensors
        st = ctx.state
        if st.mode == "grad":
            return _vjp(ctx.fn, x, r), None, None, None
        r = _arriving(ctx, r)
        if st.rules.softmax == "identity":
            return r, None, None, None
        dim = ctx.fn.dim
        x = torch.where(torch.isneginf(x), torch.zeros_like(x), x)
        return x * (r - s * r.sum(dim, keepdim=True)), None, None, None


class _Norm(_Identity):
    """LayerNorm / GroupNorm / RMSNorm: identity, or (``norm="centred"``) the standard deviation
    held constant and the rest, a centring and an affine map, by the epsilon rule:
    ``R_x = x . J^T (R / (y + eps))`` with ``J`` the Jacobian at constant std (LXT's
    ``layer_norm_grad_fn`` trick, written out)."""

    @staticmethod
    def backward(ctx, r):
        x, y = ctx.saved_tensors
        st = ctx.state
        if st.mode == "grad":
            return _vjp(ctx.fn, x, r), None, None, None
        r = _arriving(ctx, r)
        if st.rules.norm == "identity":
            return r, None, None, None
        g = _stable_div(r, y, st.eps)
        return x * ctx.fn.constant_std_vjp(x, g), None, None, None


class _LayerNormFn:
    """``F.layer_norm`` / ``F.rms_norm`` / ``F.group_norm`` as a callable that also knows its
    Jacobian-transpose at constant standard deviation."""

    def __init__(self, func: Callable, args: tuple, kwargs: dict) -> None:
        self.func, self.args, self.kwargs = func, args, kwargs
        name = func.__name__
        self.kind = "group" if name == "group_norm" else "rms" if name == "rms_norm" else "layer"
        sig = {"layer": ("normalized_shape", "weight", "bias", "eps"), "rms": ("normalized_shape", "weight", "eps"),
               "group": ("num_groups", "weight", "bias", "eps")}[self.kind]
        vals = dict(zip(sig, args))
        vals.update({k: v for k, v in kwargs.items() if k in sig})
        self.shape_or_groups = vals[sig[0]]
        self.weight = vals.get("weight")
        self.eps = vals.get("eps")

    def __call__(self, x: Tensor) -> Tensor:
        return self.func(x, *self.args, **self.kwargs)

    def constant_std_vjp(self, x: Tensor, g: Tensor) -> Tensor:
        if self.kind == "group":
            n, c = x.shape[:2]
            if self.weight is not None:
                g = g * self.weight.reshape(1, c, *([1] * (x.dim() - 2)))
            xg, gg = x.reshape(n, self.shape_or_groups, -1), g.reshape(n, self.shape_or_groups, -1)
            eps = 1e-5 if self.eps is None else self.eps
            std = (xg.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
            h = gg / std
            return (h - h.mean(-1, keepdim=True)).reshape(x.shape)
        shape = self.shape_or_groups
        dims = tuple(range(-len(shape) if isinstance(shape, (tuple, list, torch.Size)) else -1, 0))
        if self.weight is not None:
            g = g * self.weight
        if self.kind == "rms":
            eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
            return g / (x.pow(2).mean(dims, keepdim=True) + eps).sqrt()
        eps = 1e-5 if self.eps is None else self.eps
        h = g / (x.var(dims, unbiased=False, keepdim=True) + eps).sqrt()
        return h - h.mean(dims, keepdim=True)


class _BatchNorm(_Identity):
    """``F.batch_norm`` with running statistics, an affine map ``a x + b`` per channel: identity
    (Chefer's ``BatchNorm2d`` relprop, up to its 1e-9) or the epsilon rule ``R_x = a x R / (y + eps)``
    (equal to folding it into the preceding convolution)."""

    @staticmethod
    def backward(ctx, r):
        x, y = ctx.saved_tensors
        st = ctx.state
        if st.mode == "grad":
            return _vjp(ctx.fn, x, r), None, None, None
        r = _arriving(ctx, r)
        if st.rules.batch_norm == "identity":
            return r, None, None, None
        return x * _vjp(ctx.fn, x, _stable_div(r, y, st.eps)), None, None, None


# --- which torch calls get which rule ---------------------------------------------------------

T = torch.Tensor
_ADD = {torch.add, T.add, T.__add__, T.__radd__, T.__iadd__}
_SUB = {torch.sub, torch.subtract, T.sub, T.subtract, T.__sub__, T.__isub__}
_RSUB = {T.__rsub__, torch.rsub}
_MUL = {torch.mul, torch.multiply, T.mul, T.multiply, T.__mul__, T.__rmul__, T.__imul__}
_DIV = {torch.div, torch.divide, torch.true_divide, T.div, T.divide, T.true_divide, T.__truediv__,
        T.__itruediv__}
_MATMUL = {torch.matmul, T.matmul, T.__matmul__, torch.bmm, T.bmm}
_SOFTMAX = {F.softmax, torch.softmax, T.softmax}
_CONV = {F.conv1d, F.conv2d, F.conv3d}
_NORMS = {F.layer_norm, F.group_norm} | ({F.rms_norm} if hasattr(F, "rms_norm") else set())
_UNARY = {
    F.gelu, F.relu, torch.relu, T.relu, F.silu, torch.sigmoid, T.sigmoid, F.sigmoid, torch.tanh, T.tanh, F.tanh,
    F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.softplus, F.hardtanh, F.relu6,
    T.neg, torch.neg, T.__neg__, torch.erf, T.erf, F.instance_norm,
}
_SELECT = {T.__getitem__, T.select, torch.select, T.index_select, torch.index_select}
_INPLACE = {T.add_, T.sub_, T.mul_, T.div_, T.addmm_, T.relu_, F.relu_, T.sigmoid_, T.tanh_}
#: in-place ops traced as their out-of-place version (``x += shortcut`` in ResNets rebinds ``x`` to
#: the result; an update whose result is discarded is caught when the stale tensor is used again)
_INPLACE_AS = {T.add_: torch.add, T.sub_: torch.sub, T.mul_: torch.mul, T.div_: torch.div, T.relu_: torch.relu,
               F.relu_: torch.relu, T.sigmoid_: torch.sigmoid, T.tanh_: torch.tanh}
_FUSED = {F.scaled_dot_product_attention}
#: linear maps without weights: the z-rule (by name: torch wraps some of them, e.g. max_pool2d)
_LINEAR_OPS = {
    "interpolate", "upsample", "upsample_bilinear", "upsample_nearest", "avg_pool1d", "avg_pool2d",
    "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "max_pool1d",
    "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "_max_pool1d", "_max_pool2d", "_max_pool3d", "_adaptive_max_pool1d", "_adaptive_max_pool2d",
    "_adaptive_max_pool3d", "mean", "sum", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "fold",
}
#: ops whose gradient moves values without changing them (relevance passes unchanged)
_MOVES = {
    "reshape", "view", "view_as", "permute", "transpose", "t", "unbind", "split", "chunk", "flatten",
    "unflatten", "squeeze", "unsqueeze", "expand", "expand_as", "contiguous", "clone", "cat", "concat",
    "concatenate", "stack", "narrow", "to", "float", "double", "half", "bfloat16", "type_as", "type",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "__get__", "movedim", "moveaxis", "swapaxes", "repeat",
    "tile", "roll", "flip", "detach", "requires_grad_", "pad", "split_with_sizes", "tensor_split", "alias",
    "identity", "unfold", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
}

#: moves of one tensor (the output holds the same values): views for the fork count
_VIEWS = _MOVES - {"cat", "concat", "concatenate", "stack", "repeat", "tile", "expand", "expand_as", "pad",
                   "unbind", "split", "chunk", "split_with_sizes", "tensor_split", "unfold"}


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


class _Call:
    """``func(x, *rest, **kwargs)`` as a one-argument callable (kept on the autograd ctx; it
    holds constants only, never a traced tensor)."""

    def __init__(self, func: Callable, rest: tuple = (), kwargs: dict | None = None, dim: int | None = None) -> None:
        self.func, self.rest, self.kwargs, self.dim = func, rest, kwargs or {}, dim

    def __call__(self, x: Tensor) -> Tensor:
        return self.func(x, *self.rest, **self.kwargs)


_INPLACE_ARG: dict[Callable, int | None] = {}


def _out_of_place(func: Callable, rest: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Drop ``inplace=True`` (``nn.ReLU(inplace=True)`` and the like): the traced call returns a
    new tensor, which is what the calling module uses."""
    if func not in _INPLACE_ARG:
        try:
            params = list(inspect.signature(func).parameters)
            _INPLACE_ARG[func] = params.index("inplace") - 1 if "inplace" in params else None
        except (TypeError, ValueError):
            _INPLACE_ARG[func] = None
    i = _INPLACE_ARG[func]
    if i is None:
        return rest, kwargs
    if "inplace" in kwargs:
        kwargs = {**kwargs, "inplace": False}
    if 0 <= i < len(rest):
        rest = (*rest[:i], False, *rest[i + 1:])
    return rest, kwargs


def _const(c: Any) -> Any:
    return c.detach() if isinstance(c, Tensor) else c


class _Tracer(TorchFunctionMode):
    """Marks tensors computed from the traced input (the first block's input for the ViT
    explainers, the image for ``lrp``), swaps in the relevance functions (when ``lrp``) and
    records each block's attention probabilities (softmax outputs)."""

    def __init__(self, state: _State, lrp: bool, n_blocks: int = 0) -> None:
        super().__init__()
        self.state = state
        self.lrp = lrp
        self.marked: dict[int, weakref.ref] = {}
        self.images: dict[int, weakref.ref] = {}
        self.nodes: dict[int, tuple[weakref.ref, _Node]] = {}
        self.scales: dict[int, tuple[weakref.ref, float]] = {}
        self.superseded: dict[int, tuple[weakref.ref, str]] = {}
        self.block = -1
        self.attention: list[list[Tensor]] = [[] for _ in range(n_blocks)]
        self.unknown: set[str] = set()

    @staticmethod
    def _lookup(table: dict, t: Any) -> Any:
        entry = table.get(id(t)) if isinstance(t, Tensor) else None
        return entry[1] if entry is not None and entry[0]() is t else None

    def mark(self, obj: Any, image: bool = False) -> None:
        for t in _tensors(obj):
            if t.is_floating_point() or t.is_complex():
                self.marked[id(t)] = weakref.ref(t)
                if image:
                    self.images[id(t)] = weakref.ref(t)

    def is_act(self, t: Any) -> bool:
        ref = self.marked.get(id(t)) if isinstance(t, Tensor) else None
        return ref is not None and ref() is t

    def is_image(self, t: Any) -> bool:
        ref = self.images.get(id(t)) if isinstance(t, Tensor) else None
        return ref is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in _tensors((args, kwargs)) if self.is_act(t)]
        if not inputs:
            return func(*args, **kwargs)
        stale = next((self._lookup(self.superseded, t) for t in inputs if self._lookup(self.superseded, t)), None)
        if stale is not None:
            raise InputError(
                f"relevance: a tensor updated in place ({stale}) is used again after the update; the tracer "
                "runs in-place updates out of place, so the model must use their result (x = x.add_(y) or "
                "x += y), or be built with its in-place options off"
            )
        if func in _FUSED:
            raise InputError(
                "relevance: the model calls F.scaled_dot_product_attention, which hides the attention "
                "matrix; its attention modules must expose a `fused_attn` flag (timm's do) or compute "
                "softmax(q k^T) explicitly"
            )
        constant = self.lrp and func in _SOFTMAX and self.state.rules.softmax == "constant"
        node = _Node() if self.lrp and not constant else None
        if constant:  # CP-LRP: the attention probabilities are constant weights
            out = func(*args, **kwargs).detach()
        else:
            out = self._apply(func, args, kwargs, node) if self.lrp else func(*args, **kwargs)
        if not any(True for _ in _tensors(out)):
            return out
        if self.lrp and len(inputs) == 1 and isinstance(out, Tensor) and \
                getattr(func, "__name__", None) in _VIEWS:
            # a view / reshape / eval-mode dropout of one tensor is that tensor for the fork count:
            # its consumers are the producer's consumers (Chefer's Clone sits on the value)
            source = self._lookup(self.nodes, inputs[0])
            if source is not None:
                self.mark(out)
                self.nodes[id(out)] = (weakref.ref(out), source)
                return out
        for t in inputs:
            used = self._lookup(self.nodes, t)
            if used is not None:
                used.uses += 1
        if func in _SOFTMAX and self.block >= 0 and isinstance(out, Tensor) and out.dim() == 4 \
                and out.shape[-1] == out.shape[-2]:
            self.attention[self.block].append(out)
        if constant:
            return out
        self.mark(out)
        if node is not None and isinstance(out, Tensor):
            self.nodes[id(out)] = (weakref.ref(out), node)
        return out

    def _apply(self, func: Callable, args: tuple, kwargs: dict, node: _Node) -> Any:
        st = self.state
        rules = st.rules
        act = self.is_act
        name = getattr(func, "__name__", repr(func))
        if func in _INPLACE_AS and act(args[0]):
            out = self._apply(_INPLACE_AS[func], args, kwargs, node)
            self.superseded[id(args[0])] = (weakref.ref(args[0]), name)
            return out
        if func in _INPLACE:
            raise InputError(
                f"relevance: in-place {name} on traced activations is not supported; build the model "
                "with its in-place options off (e.g. timm LayerScale inplace=False)"
            )
        if func is F.linear or func in _CONV:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if act(w) or act(b) or not act(x):
                return self._unsupported(name, "a weight or bias computed from the input")
            if func is F.linear:
                op = _Op("linear", x.shape)
            else:
                names = ("stride", "padding", "dilation", "groups")
                conf = dict(zip(names, args[3:]))
                conf.update({k: kwargs[k] for k in names if k in kwargs})
                op = _Op("conv", x.shape, **conf)
            return _Affine.apply(x, w.detach(), _const(b), op, self.is_image(x), st, node)
        if func in _ADD or func in _SUB or func in _RSUB:
            a, b = args[0], args[1] if len(args) > 1 else kwargs["other"]
            coef = kwargs.get("alpha", 1)
            if func in _RSUB:
                a, b = b, a
            if func in _SUB or func in _RSUB:
                coef = -coef
            if isinstance(a, Tensor) and isinstance(b, Tensor):
                return _Add.apply(a if act(a) else a.detach(), b if act(b) else b.detach(), coef, st, node)
            if rules.scalar_shift == "identity":
                if isinstance(b, Tensor):  # constant + coef * x
                    return _Identity.apply(b, lambda t, a=a, coef=coef: a + coef * t, st, node)
                return _Identity.apply(a, lambda t, b=b, coef=coef: t + coef * b, st, node)
            x = a if isinstance(a, Tensor) else b
            a, b = (a, torch.tensor(b, dtype=x.dtype, device=x.device)) if x is a else \
                (torch.tensor(a, dtype=x.dtype, device=x.device), b)
            return _Add.apply(a, b, coef, st, node)
        if func in _MUL or func in _DIV:
            a, b = args[0], args[1] if len(args) > 1 else kwargs["other"]
            if func in _MUL and act(a) and act(b):
                return _Bilinear.apply(a, b, torch.mul, 1.0, st, node)
            if act(b) and func in _DIV:
                return self._unsupported(name, "a divisor computed from the input")
            x, c = (a, _const(b)) if act(a) else (b, _const(a))
            rest = {k: v for k, v in kwargs.items() if k != "other"}
            out = _Identity.apply(x, _Call(func, (c,), rest), st, node)
            if isinstance(c, (int, float)) and not rest:
                self.scales[id(out)] = (weakref.ref(out), float(c) if func in _MUL else 1.0 / c)
            return out
        if func in _MATMUL:
            a, b = args[0], args[1] if len(args) > 1 else kwargs["other"]
            mm = torch.bmm if func in (torch.bmm, T.bmm) else torch.matmul
            if act(a) and act(b):
                scale = (self._lookup(self.scales, a) or 1.0) * (self._lookup(self.scales, b) or 1.0)
                return _Bilinear.apply(a, b, mm, scale, st, node)
            if act(a) and b.dim() == 2:
                return _Affine.apply(a, b.detach().t(), None, _Op("linear", a.shape), self.is_image(a), st, node)
            if act(a):
                return _ZRule.apply(a, lambda t, c=b.detach(): mm(t, c), st, node)
            return _ZRule.apply(b, lambda t, c=a.detach(): mm(c, t), st, node)
        if func is torch.einsum:
            eq, *ops = args if len(args) > 2 or not isinstance(args[1], (list, tuple)) else (args[0], *args[1])
            if len(ops) == 2 and act(ops[0]) and act(ops[1]):
                scale = (self._lookup(self.scales, ops[0]) or 1.0) * (self._lookup(self.scales, ops[1]) or 1.0)
                return _Bilinear.apply(ops[0], ops[1], lambda u, v: torch.einsum(eq, u, v), scale, st, node)
            if len(ops) == 2:
                if act(ops[0]):
                    return _ZRule.apply(ops[0], lambda t, c=ops[1].detach(): torch.einsum(eq, t, c), st, node)
                return _ZRule.apply(ops[1], lambda t, c=ops[0].detach(): torch.einsum(eq, c, t), st, node)
            return self._unsupported(name, "more than two operands")
        if func in _SOFTMAX or func in _NORMS or func is F.batch_norm or func in _UNARY or func in _SELECT:
            x, rest = (args[0], args[1:]) if args else (kwargs.pop("input"), ())
            if any(act(t) for t in _tensors((rest, kwargs))):
                return self._unsupported(name, "parameters or indices computed from the input")
            rest, kwargs = tuple(_const(c) for c in rest), {k: _const(v) for k, v in kwargs.items()}
            if func in _SOFTMAX:
                dim = rest[0] if rest else kwargs.get("dim")
                if dim is None:
                    return self._unsupported(name, "an implicit dim")
                return _Softmax.apply(x, _Call(func, rest, kwargs, dim=dim), st, node)
            if func in _NORMS:
                return _Norm.apply(x, _LayerNormFn(func, rest, kwargs), st, node)
            if func is F.batch_norm:
                training = rest[4] if len(rest) > 4 else kwargs.get("training", False)
                rule = _Identity if training or (rest[0] if rest else kwargs.get("running_mean")) is None \
                    else _BatchNorm
                return rule.apply(x, _Call(func, rest, kwargs), st, node)
            if func in _SELECT:
                return _Select.apply(x, _Call(func, rest, kwargs), st, node)
            rest, kwargs = _out_of_place(func, rest, kwargs)
            return _Identity.apply(x, _Call(func, rest, kwargs), st, node)
        if name in _LINEAR_OPS and not kwargs.get("return_indices"):
            x, rest = (args[0], args[1:]) if args else (kwargs.pop("input"), ())
            if act(x) and not any(act(t) for t in _tensors((rest, kwargs))):
                rest, kwargs = tuple(_const(c) for c in rest), {k: _const(v) for k, v in kwargs.items()}
                return _ZRule.apply(x, _Call(func, rest, kwargs), st, node)
        out = func(*args, **kwargs)
        if name not in _MOVES and any(t.is_floating_point() for t in _tensors(out)):
            self.unknown.add(name)
        return out

    def _unsupported(self, name: str, what: str) -> Any:
        raise InputError(f"relevance: no relevance rule for {name} with {what}")


# --- finding the transformer inside a model ---------------------------------------------------

def _find_blocks(model: nn.Module, path: str | None) -> tuple[nn.Module, nn.Module]:
    """The container of attention blocks and the module owning it (for tokens and grid)."""
    if path is None:
        found = [n for n, m in model.named_modules()
                 if n.split(".")[-1] == "blocks" and isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m)]
        if not found:
            raise InputError(
                f"vit-lrp: no `blocks` container (nn.Sequential / nn.ModuleList of transformer blocks) "
                f"found in {type(model).__name__}; pass blocks='dotted.path.to.blocks'"
            )
        path = min(found, key=lambda n: n.count("."))
    blocks = resolve_layer(model, path)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise InputError(f"vit-lrp: blocks={path!r} is a {type(blocks).__name__}, expected a non-empty "
                         "nn.Sequential or nn.ModuleList of transformer blocks")
    owner = resolve_layer(model, path.rsplit(".", 1)[0]) if "." in path else model
    return blocks, owner


def _prefix_tokens(owner: nn.Module, override: int | None) -> int:
    if override is not None:
        n = override
    elif hasattr(owner, "num_prefix_tokens"):
        n = int(owner.num_prefix_tokens)
    else:
        n = 1 if getattr(owner, "cls_token", None) is not None else 0
    if n < 1:
        raise InputError(
            f"vit-lrp: the maps are read from the class-token row, but {type(owner).__name__} has no "
            "class token (num_prefix_tokens=0)"
        )
    return n


@contextmanager
def traced(model: nn.Module, hooks: list, state: _State, lrp: bool, blocks: nn.Module | None = None,
           name: str = "relevance") -> Iterator[_Tracer]:
    """Fused attention off, the tracing mode active (and, given ``blocks``, hooks that mark the
    first block's input and number the blocks); all undone on exit, also on errors. Without
    ``blocks`` the caller marks what it traces from (``tracer.mark(x, image=True)``)."""
    tracer = _Tracer(state, lrp, len(blocks) if blocks is not None else 0)
    flags = [(m, m.fused_attn) for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]

    def enter(i: int):
        def pre(module, args):
            if i == 0:
                tracer.mark(args[0] if args else None)
            tracer.block = i
        return pre

    def leave(module, args, output):
        tracer.block = -1

    try:
        for m, _ in flags:
            m.fused_attn = False
        for i, blk in enumerate(blocks if blocks is not None else ()):
            hooks.append(blk.register_forward_pre_hook(enter(i)))
            hooks.append(blk.register_forward_hook(leave))
        with tracer:
            yield tracer
    finally:
        for m, flag in flags:
            m.fused_attn = flag
    if tracer.unknown:
        warnings.warn(
            f"{name}: no relevance rule for {sorted(tracer.unknown)}; relevance passed them with their "
            "gradient", stacklevel=4,
        )


# --- explainers -------------------------------------------------------------------------------

def require_autograd(name: str, images: Tensor) -> None:
    """Gradient-based explainers enable autograd themselves (a caller's ``torch.no_grad()`` is
    fine) but cannot work under ``torch.inference_mode()``, nor on tensors created in it (they
    can never require grad): say so instead of autograd's "does not require grad"."""
    if torch.is_inference_mode_enabled():
        raise InputError(
            f"{name}: needs gradients but was called under torch.inference_mode(); call explain() "
            "outside inference mode (torch.no_grad() is fine: the explainer enables gradients itself)"
        )
    if images.is_inference():
        raise InputError(
            f"{name}: the images were created under torch.inference_mode() and can never require "
            "gradients; pass images.clone() made outside inference mode"
        )


class _Traced:
    """What one traced pass returns: attention maps, and optionally their gradients and
    relevances, all (B, heads, N, N), plus the layout of the tokens."""

    def __init__(self, attention, grads, relevance, prefix, grid):
        self.attention, self.grads, self.relevance = attention, grads, relevance
        self.prefix, self.grid = prefix, grid

    def to_map(self, rows: Tensor) -> Tensor:
        """(B, N) class-token rows -> (B, rows, cols) patch maps."""
        return rows[:, self.prefix:].reshape(rows.shape[0], *self.grid)


class ViTExplainer(Explainer):
    """Shared machinery of the ViT explainers: trace one forward pass, take gradients and/or
    relevances of every block's attention probabilities."""

    need_grads = False
    need_relevance = False
    rules = "chefer"
    eps = 1e-9
    alpha = 1.0

    class Config(ComponentConfig):
        blocks: str | None = Field(
            None, description="Dotted path of the container of transformer blocks; None finds the "
            "shallowest `blocks` nn.Sequential/ModuleList (timm ViT, DeiT, hybrid R50+ViT).")
        prefix_tokens: int | None = Field(
            None, ge=1, description="Tokens before the patch tokens (class token first); None reads "
            "the model's num_prefix_tokens.")

    def trace(self, model: nn.Module, images: Tensor, targets: Targets, hooks: list) -> _Traced:
        cfg = self.config
        blocks, owner = _find_blocks(model, cfg.blocks)
        prefix = _prefix_tokens(owner, cfg.prefix_tokens)
        state = _State(getattr(cfg, "eps", self.eps), getattr(cfg, "alpha", self.alpha), self.rules)
        differentiate = self.need_grads or self.need_relevance
        if differentiate:
            require_autograd(self.registry_name or type(self).__name__, images)
        # the whole differentiation runs with autograd on, so a caller's torch.no_grad() is
        # harmless (issue 17); without gradients the forward runs with it off (cheaper)
        with torch.set_grad_enabled(differentiate):
            x = images.detach().requires_grad_(differentiate)
            with traced(model, hooks, state, self.need_relevance, blocks, self.registry_name or "vit-lrp") as tracer:
                output = model(x)
            bad = [(i, len(a)) for i, a in enumerate(tracer.attention) if len(a) != 1]
            if bad:
                raise InputError(
                    f"vit-lrp: expected one attention softmax (B, heads, N, N) per block, found {bad[:5]} "
                    "(block index, count)"
                )
            attention = [a[0] for a in tracer.attention]
            grads = relevance = None
            if differentiate:
                scores = target_scores(output, targets)
                state.mode = "grad"
                if self.need_grads:
                    grads = list(torch.autograd.grad(scores.sum(), attention, retain_graph=True))
                if self.need_relevance:
                    seed = torch.autograd.grad(scores.sum(), output, retain_graph=True)[0]
                    state.mode = "lrp"
                    relevance = list(torch.autograd.grad(output, attention, seed))
            else:
                target_scores(output, targets)  # class-agnostic methods ignore the targets, but check them
        n = attention[0].shape[-1]
        grid = token_grid(owner, n - prefix, tuple(images.shape[-2:]))
        attention = [a.detach() for a in attention]
        return _Traced(attention, grads, relevance, prefix, grid)


#: the first rolled-out block of the authors' Table 2/3 runs (generate_visualizations.py and
#: imagenet_seg_eval.py call generate_LRP / generate_rollout with start_layer=1)
AUTHORS_START_LAYER = 1


def start_layer(configured: int | None, n_blocks: int) -> int:
    """``start_layer`` of the config, or (None) the authors' 1 -- 0 for a one-block model, which
    has no block 1."""
    return min(AUTHORS_START_LAYER, n_blocks - 1) if configured is None else configured


def rollout(layers: list[Tensor], start: int, normalize: bool | None = None, *,
            normalise: bool | None = None) -> Tensor:
    """Product over blocks ``start..L-1`` of ``A_b + I`` (rows normalised if ``normalize``),
    (B, N, N). ``normalise`` is the deprecated spelling of ``normalize``."""
    if normalise is not None:
        warnings.warn("rollout(normalise=...) is deprecated; use normalize=...", DeprecationWarning, stacklevel=2)
        normalize = normalise if normalize is None else normalize
    if normalize is None:
        raise TypeError("rollout() missing the argument 'normalize'")
    if not 0 <= start < len(layers):
        raise InputError(f"start_layer={start} out of range for a model with {len(layers)} blocks")
    eye = torch.eye(layers[0].shape[-1], dtype=layers[0].dtype, device=layers[0].device)
    joint = None
    for a in layers[start:]:
        a = a + eye
        if normalize:
            a = a / a.sum(dim=-1, keepdim=True)
        joint = a if joint is None else a.bmm(joint)
    return joint
