"""Transformer attribution for Vision Transformers and the attention baselines it is compared to.

Chefer, Gur and Wolf, "Transformer Interpretability Beyond Attention Visualization" (CVPR 2021),
as replicated in ``vit-lrp-affinitynet.txt`` (sections 4.1, 4.2, 5.2; Tables 2 and 3).

Registered here (all explainers for timm Vision Transformers: ``vit_*``, DeiT, the hybrid
R50+ViT ``vit_base_r50_s16_*`` and any model with a ``blocks`` container of attention blocks):

* ``vit-lrp``: the paper's method. Relevance propagation (section 4.2) with LRP alpha1-beta0
  for linear layers, the z-rule with the two-input normalisation for additions and matrix
  products, identity for norms, activations and softmax; per block the attention relevance
  ``R_b`` and the attention gradient ``G_b`` give ``mean_heads((G_b * R_b)^+)``; these are
  rolled out with the identity from ``start_layer`` (no row normalisation, as in the authors'
  code) and the class-token row over the patch tokens is the map.
* ``attention-rollout`` (Abnar & Zuidema 2020, column "rollout" of Tables 2/3): head-averaged
  attention plus identity, row-normalised, multiplied over the blocks.
* ``raw-attention`` (column "raw attention"): the last block's head-averaged attention,
  class row. (``raw-attention`` is taken by the CA-Stream ``ca-attention`` alias.)
* ``attn-grad-cam`` (column "GradCAM"): the last block's class-row attention per head weighted by
  that head's mean attention gradient, averaged over heads, positive part.
* ``partial-lrp`` (Voita et al. 2019, column "partial LRP"): the last block's attention
  relevance, positive part averaged over heads, class row.

How the rules reach timm's modules without rewriting them
---------------------------------------------------------
During the explainer's forward pass a :class:`torch.overrides.TorchFunctionMode` sees every torch
call made inside the transformer blocks and the head (the input of the first block is marked,
and marks spread to every tensor computed from it). Calls on marked tensors are replaced by
custom autograd functions with two backward modes sharing one forward graph:

* ``grad``: the exact gradient (used for the attention gradients ``G_b``);
* ``lrp``: the relevance rule, with relevance (not relevance / activation) carried in the
  backward slot as in the authors' ``relprop``:

  - ``F.linear`` (and ``x @ W`` with a constant 2-D ``W``): alpha-beta rule (alpha=1, beta=0)
    without the bias, ``R_x = x+ . (S W+) + x- . (S W-)``, ``S = R / (x+ W+^T + x- W-^T)``;
  - addition of two tensors (the residual connections): z-rule ``R_a = a . R / (a + b)`` then
    the two-input normalisation of section 4.2 (each share rescaled so that
    ``|sum R_a| : |sum R_b|`` is kept and the total equals ``sum R``), sums taken **per sample**
    so a batch is explained exactly like its images one by one;
  - product of two marked tensors (``q @ k^T``, ``attn @ v``, einsum, elementwise gates):
    z-rule on both operands, each halved -- the normalisation of section 4.2 reduces to this
    because both operand relevances sum to ``sum R`` (the authors' code divides by 2);
  - norms (LayerNorm, GroupNorm, RMSNorm), softmax, elementwise activations, multiplication or
    division by a constant (``q * scale``, LayerScale): identity, ``R_x = R_y``;
  - index selection (``x[:, 0]``, the class-token pooling): z-rule, ``R * y / (y + eps)``;
  - reshapes, views, concatenation, eval-mode dropout: their gradient, which moves relevance
    without changing it. Any other op on marked tensors keeps its gradient and is reported once
    with a warning.

Denominators are stabilised like the authors' ``safe_divide``: ``a / (b + eps)`` with
``eps = 1e-9`` and 0 where ``b == 0``.

timm's fused attention (``F.scaled_dot_product_attention``) hides the attention matrix, so every
module's ``fused_attn`` flag is switched off for the call and restored afterwards (also on
errors); hooks are appended to ``hooks`` and removed by :meth:`Explainer.explain`.

Decisions where the sources differ
----------------------------------
* The authors' code sums the addition relevances over the whole batch (it is only ever run with
  one image); we sum per sample, so a batch gives exactly the maps of its images one by one.
* The stabiliser is not a detail at 1e-6: over 12 blocks the ``eps`` placements change maps by
  up to 3e-3 relative. They are reproduced: at a fork (a tensor consumed twice, the residual
  stream) the summed relevance gets ``y / (y + eps)`` (the authors' ``Clone``), the class-token
  selection is a z-rule (their ``IndexSelect``), and a product whose operand was just scaled by
  a constant (timm's ``q * scale @ k^T``) scales ``eps`` with it, giving the relevance of
  ``(q @ k^T) * scale`` (their model). With ``eps = 0`` every variant agrees anyway.

Fidelity check against the authors' code (out of band, not part of the package or its tests):
the public ``hila-chefer/Transformer-Explainability`` code (``baselines/ViT/ViT_LRP.py``,
``modules/layers_ours.py``, commit c3e578f) was run on CPU in float64 with the weights of
randomly initialised timm ViTs (``vit_base_patch16_224`` full size and ``vit_tiny_patch16_224``,
biases and norm parameters perturbed; ``load_state_dict`` strict, its final LayerNorm eps set to
timm's 1e-6), ``relprop(one_hot, method="transformer_attribution", start_layer=s, alpha=1)``
after ``one_hot . output`` was back-propagated. Our maps on the same timm model and image differ
by at most 2.3e-15 relative (max |ours - ref| / max |ref|, also elementwise), for start_layer 0
and 5; ``partial-lrp`` ("last_layer"), ``raw-attention`` ("last_layer_attn"),
``attention-rollout`` (``generate_rollout``) and ``attn-grad-cam`` (``generate_cam_attn``)
agree to 6e-16. The script and how to run it are in ``docs/wsss.md``. The test suite keeps an
independent float64 re-derivation on a tiny ViT (``tests/test_vit_lrp.py``).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

# --- relevance rules as autograd functions ---------------------------------------------------

class _State:
    """Backward mode shared by the functions of one graph: ``"grad"`` or ``"lrp"``."""

    def __init__(self, eps: float, alpha: float) -> None:
        self.mode = "grad"
        self.eps = eps
        self.alpha = alpha


class _Node:
    """Bookkeeping of one replaced call's output: how many calls consumed it, and the output
    itself while it is a fork (consumed more than once)."""

    __slots__ = ("uses", "out")

    def __init__(self) -> None:
        self.uses = 0
        self.out: Tensor | None = None


def _stable_div(num: Tensor, den: Tensor, eps: float) -> Tensor:
    """``num / (den + eps)``, 0 where ``den == 0`` (the reference's ``safe_divide``)."""
    shifted = den + eps
    shifted.masked_fill_(shifted == 0, eps)
    return (num / shifted).masked_fill_(den == 0, 0)


def _arriving(ctx, r: Tensor) -> Tensor:
    """Relevance arriving at a replaced call's output. At a fork the summed relevance of the
    consumers gets the z-rule factor ``y / (y + eps)`` of the authors' ``Clone`` relprop."""
    node = ctx.node
    if ctx.state.mode == "lrp" and node is not None and node.out is not None:
        return r * _stable_div(node.out, node.out, ctx.state.eps)
    return r


def _sample_sum(t: Tensor) -> Tensor:
    """Sum over every dim but the first, kept broadcastable: (B, 1, ..., 1)."""
    return t.reshape(t.shape[0], -1).sum(1).reshape(t.shape[0], *([1] * (t.dim() - 1)))


def _alpha_beta(x: Tensor, weight: Tensor, r: Tensor, alpha: float, eps: float) -> Tensor:
    """LRP alpha-beta rule of a linear map ``x W^T`` (bias excluded), beta = alpha - 1."""
    px = x.clamp(min=0)
    nx = x - px
    pw = weight.clamp(min=0)
    nw = weight - pw

    def share(w1: Tensor, w2: Tensor) -> Tensor:
        s = _stable_div(r, F.linear(px, w1) + F.linear(nx, w2), eps)
        return px * s.matmul(w1) + nx * s.matmul(w2)

    out = share(pw, nw)
    if alpha != 1:
        out = alpha * out - (alpha - 1) * share(nw, pw)
    return out


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, state, node):
        ctx.save_for_backward(x, weight)
        ctx.state, ctx.node = state, node
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, r):
        x, weight = ctx.saved_tensors
        st = ctx.state
        if st.mode == "grad":
            return r.matmul(weight), None, None, None, None
        return _alpha_beta(x, weight, _arriving(ctx, r), st.alpha, st.eps), None, None, None, None


class _Add(torch.autograd.Function):
    """``a + coef * b`` with the z-rule and the two-input normalisation (section 4.2)."""

    @staticmethod
    def forward(ctx, a, b, coef, state, node):
        ctx.save_for_backward(a, b)
        ctx.coef, ctx.state, ctx.node = coef, state, node
        return a + b if coef == 1 else a + coef * b

    @staticmethod
    def backward(ctx, r):
        a, b = ctx.saved_tensors
        coef, st = ctx.coef, ctx.state
        if st.mode == "grad":
            ra, rb = r, r * coef
        else:
            r = _arriving(ctx, r)
            bc = b if coef == 1 else coef * b
            s = _stable_div(r, a + bc, st.eps)
            ra, rb = a * s, bc * s
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
        ctx.save_for_backward(u, v)
        ctx.fn, ctx.scale, ctx.state, ctx.node = fn, scale, state, node
        return fn(u, v)

    @staticmethod
    def backward(ctx, r):
        u, v = ctx.saved_tensors
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
    """Identity rule ``R_x = R_y`` for ``y = fn(x)`` (norms, softmax, activations, scaling)."""

    @staticmethod
    def forward(ctx, x, fn, state, node):
        ctx.save_for_backward(x)
        ctx.fn, ctx.state, ctx.node = fn, state, node
        return fn(x)

    @staticmethod
    def backward(ctx, r):
        (x,) = ctx.saved_tensors
        if ctx.state.mode == "lrp":
            r = _arriving(ctx, r)
            return (r if r.shape == x.shape else r.sum_to_size(x.shape)), None, None, None
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(ctx.fn(xx), xx, r)
        return g, None, None, None


class _Select(_Identity):
    """Index selection ``y = x[index]`` (the class-token pooling): z-rule, i.e. the relevance
    times ``y / (y + eps)`` scattered back (the authors' ``IndexSelect`` relprop). Same forward as
    :class:`_Identity`; only the relevance rule differs."""


    @staticmethod
    def backward(ctx, r):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            y = ctx.fn(xx)
            if ctx.state.mode == "lrp":
                r = _arriving(ctx, r) * _stable_div(y.detach(), y.detach(), ctx.state.eps)
            (g,) = torch.autograd.grad(y, xx, r)
        return g, None, None, None


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
_UNARY = _SOFTMAX | {
    F.layer_norm, F.group_norm, F.batch_norm, F.instance_norm, F.gelu, F.relu, torch.relu, T.relu,
    F.silu, torch.sigmoid, T.sigmoid, F.sigmoid, torch.tanh, T.tanh, F.tanh, F.hardswish, F.hardsigmoid,
    F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.softplus, F.hardtanh, F.relu6, T.neg, torch.neg,
    T.__neg__, torch.erf, T.erf,
}
if hasattr(F, "rms_norm"):
    _UNARY.add(F.rms_norm)
_SELECT = {T.__getitem__, T.select, torch.select, T.index_select, torch.index_select}
_INPLACE = {T.add_, T.sub_, T.mul_, T.div_, T.addmm_, T.relu_, F.relu_, T.sigmoid_, T.tanh_}
_FUSED = {F.scaled_dot_product_attention}
#: ops whose gradient moves values without changing them (relevance passes unchanged)
_MOVES = {
    "reshape", "view", "view_as", "permute", "transpose", "t", "unbind", "split", "chunk", "flatten",
    "unflatten", "squeeze", "unsqueeze", "expand", "expand_as", "contiguous", "clone", "cat", "concat",
    "concatenate", "stack", "narrow", "to", "float", "double", "half", "bfloat16", "type_as", "type",
    "dropout", "__get__", "movedim", "moveaxis", "swapaxes", "repeat", "tile", "roll", "flip",
    "detach", "requires_grad_", "pad", "split_with_sizes", "tensor_split", "alias", "identity",
}


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


class _Tracer(TorchFunctionMode):
    """Marks tensors computed from the first block's input, swaps in the relevance functions
    (when ``lrp``) and records each block's attention probabilities (softmax outputs)."""

    def __init__(self, state: _State, lrp: bool, n_blocks: int) -> None:
        super().__init__()
        self.state = state
        self.lrp = lrp
        self.marked: dict[int, weakref.ref] = {}
        self.nodes: dict[int, tuple[weakref.ref, _Node]] = {}
        self.scales: dict[int, tuple[weakref.ref, float]] = {}
        self.block = -1
        self.attention: list[list[Tensor]] = [[] for _ in range(n_blocks)]
        self.unknown: set[str] = set()

    @staticmethod
    def _lookup(table: dict, t: Any) -> Any:
        entry = table.get(id(t)) if isinstance(t, Tensor) else None
        return entry[1] if entry is not None and entry[0]() is t else None

    def mark(self, obj: Any) -> None:
        for t in _tensors(obj):
            self.marked[id(t)] = weakref.ref(t)

    def is_act(self, t: Any) -> bool:
        ref = self.marked.get(id(t)) if isinstance(t, Tensor) else None
        return ref is not None and ref() is t

    def finish(self) -> None:
        """After the forward: keep the outputs of forks only."""
        for ref, node in self.nodes.values():
            node.out = ref() if node.uses > 1 else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in _tensors((args, kwargs)) if self.is_act(t)]
        if not inputs:
            return func(*args, **kwargs)
        if func in _FUSED:
            raise InputError(
                "vit-lrp: the model calls F.scaled_dot_product_attention, which hides the attention "
                "matrix; its attention modules must expose a `fused_attn` flag (timm's do) or compute "
                "softmax(q k^T) explicitly"
            )
        node = _Node() if self.lrp else None
        out = self._apply(func, args, kwargs, node) if self.lrp else func(*args, **kwargs)
        if not any(True for _ in _tensors(out)):
            return out
        for t in inputs:
            used = self._lookup(self.nodes, t)
            if used is not None:
                used.uses += 1
        if func in _SOFTMAX and self.block >= 0 and isinstance(out, Tensor) and out.dim() == 4 \
                and out.shape[-1] == out.shape[-2]:
            self.attention[self.block].append(out)
        self.mark(out)
        if node is not None and isinstance(out, Tensor):
            self.nodes[id(out)] = (weakref.ref(out), node)
        return out

    def _apply(self, func: Callable, args: tuple, kwargs: dict, node: _Node) -> Any:
        st = self.state
        act = self.is_act
        name = getattr(func, "__name__", repr(func))
        if func in _INPLACE:
            raise InputError(
                f"vit-lrp: in-place {name} on activations inside the transformer is not supported; "
                "build the model with its in-place options off (e.g. timm LayerScale inplace=False)"
            )
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if act(w) or act(b):
                return self._unsupported(name, "a weight or bias computed from the input")
            return _Linear.apply(x, w.detach(), None if b is None else b.detach(), st, node)
        if func in _ADD or func in _SUB or func in _RSUB:
            a, b = args[0], args[1] if len(args) > 1 else kwargs["other"]
            coef = kwargs.get("alpha", 1)
            if func in _RSUB:
                a, b = b, a
            if func in _SUB or func in _RSUB:
                coef = -coef
            if isinstance(a, Tensor) and isinstance(b, Tensor):
                return _Add.apply(a, b, coef, st, node)
            if isinstance(b, Tensor):  # constant + coef * x
                return _Identity.apply(b, lambda t: a + coef * t, st, node)
            return _Identity.apply(a, lambda t: t + coef * b, st, node)
        if func in _MUL or func in _DIV:
            a, b = args[0], args[1] if len(args) > 1 else kwargs["other"]
            if func in _MUL and act(a) and act(b):
                return _Bilinear.apply(a, b, torch.mul, 1.0, st, node)
            if act(b) and func in _DIV:
                return self._unsupported(name, "a divisor computed from the input")
            x, c = (a, b) if act(a) else (b, a)
            rest = {k: v for k, v in kwargs.items() if k != "other"}
            out = _Identity.apply(x, lambda t: func(t, c, **rest), st, node)
            if isinstance(c, (int, float)) and not rest:
                self.scales[id(out)] = (weakref.ref(out), float(c) if func in _MUL else 1.0 / c)
            return out
        if func in _MATMUL:
            a, b = args[0], args[1] if len(args) > 1 else kwargs["other"]
            if act(a) and act(b):
                mm = torch.bmm if func in (torch.bmm, T.bmm) else torch.matmul
                scale = (self._lookup(self.scales, a) or 1.0) * (self._lookup(self.scales, b) or 1.0)
                return _Bilinear.apply(a, b, mm, scale, st, node)
            if act(a) and b.dim() == 2:
                return _Linear.apply(a, b.detach().t(), None, st, node)
            return self._unsupported(name, "a constant left operand")
        if func is torch.einsum:
            eq, *ops = args if len(args) > 2 or not isinstance(args[1], (list, tuple)) else (args[0], *args[1])
            if len(ops) == 2 and act(ops[0]) and act(ops[1]):
                scale = (self._lookup(self.scales, ops[0]) or 1.0) * (self._lookup(self.scales, ops[1]) or 1.0)
                return _Bilinear.apply(ops[0], ops[1], lambda u, v: torch.einsum(eq, u, v), scale, st, node)
            return self._unsupported(name, "operands other than two activations")
        if func in _UNARY or func in _SELECT:
            x, rest = (args[0], args[1:]) if args else (kwargs.pop("input"), ())
            if any(act(t) for t in _tensors((rest, kwargs))):
                return self._unsupported(name, "parameters or indices computed from the input")
            rule = _Select if func in _SELECT else _Identity
            return rule.apply(x, lambda t: func(t, *rest, **kwargs), st, node)
        if name not in _MOVES:
            self.unknown.add(name)
        return func(*args, **kwargs)

    def _unsupported(self, name: str, what: str) -> Any:
        raise InputError(f"vit-lrp: no relevance rule for {name} with {what}")


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
def _traced(model: nn.Module, blocks: nn.Module, hooks: list, state: _State, lrp: bool) -> Iterator[_Tracer]:
    """Fused attention off, block hooks on, the tracing mode active; all undone on exit."""
    tracer = _Tracer(state, lrp, len(blocks))
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
        for i, blk in enumerate(blocks):
            hooks.append(blk.register_forward_pre_hook(enter(i)))
            hooks.append(blk.register_forward_hook(leave))
        with tracer:
            yield tracer
        tracer.finish()
    finally:
        for m, flag in flags:
            m.fused_attn = flag
    if tracer.unknown:
        warnings.warn(
            f"vit-lrp: no relevance rule for {sorted(tracer.unknown)}; relevance passed them with their "
            "gradient", stacklevel=4,
        )


# --- explainers -------------------------------------------------------------------------------

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
        state = _State(getattr(cfg, "eps", self.eps), getattr(cfg, "alpha", self.alpha))
        differentiate = self.need_grads or self.need_relevance
        with torch.set_grad_enabled(differentiate):
            x = images.detach().requires_grad_(differentiate)
            with _traced(model, blocks, hooks, state, lrp=self.need_relevance) as tracer:
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
