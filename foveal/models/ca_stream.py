"""Pooling components: global average pooling and the CA-Stream attention pooling, and the
classifiers built on them (the CA-Stream raw-attention explainer is
:mod:`foveal.explainers.ca_attention`).

CA-Stream (Torres et al., "CA-Stream: Attention-based pooling for interpretable image
recognition", CVPRW 2024; ``ca-stream.txt``) replaces GAP in front of a frozen classifier by a
stream of cross-attention blocks between a learnable query and the features of several stages.

Registered (by :mod:`foveal.plugins.pooling` and :mod:`foveal.plugins.explainers`) as:

* ``gap`` (pooling): global average pooling.
* ``ca-stream`` (pooling, ``multi_stage``): the cross-attention stream, eq. 6 and 10.
* ``gap-classifier`` / ``ca-stream-classifier`` (model, classification): a timm classifier with
  its own GAP, or with CA-Stream in front of its unchanged classifier head.
* ``ca-attention`` (explainer): the stream's last raw attention, a class-agnostic saliency map.
"""


from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..core.checkpoint import load_weights, read_state_dict
from ..core.config import ComponentConfig
from ..core.errors import InputError
from ..core.model import Model
from ..core.modules import resolve_layer
from ..core.pooling import Pooling
from ..core.tensors import check_images


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


# --- CA-Stream ------------------------------------------------------------------------------

@lru_cache(maxsize=32)
def timm_stage_info(model_name: str) -> tuple[tuple[int, ...], int]:
    """(stage widths, pooled width ``num_features``) of a timm classifier, read from its
    ``feature_info`` on the meta device (no memory, no weights)."""
    import timm

    try:
        with torch.device("meta"):
            net = timm.create_model(model_name, pretrained=False)
    except RuntimeError as e:
        raise InputError(f"ca-stream: unknown timm model {model_name!r}: {e}") from e
    info = getattr(net, "feature_info", None)
    if not info:
        raise InputError(f"ca-stream: timm model {model_name!r} has no feature_info to find its stages from")
    return tuple(int(f["num_chs"]) for f in info), int(getattr(net, "num_features", info[-1]["num_chs"]))


class CrossAttention(nn.Module):
    """One CA block, eq. 6: ``CA(q, F) = F^T softmax(F q / sqrt(d))`` over the p = h*w
    positions of F (B, d, h, w), for a query q (B, d).

    No query/key/value projections by default (section 3.2). ``heads`` > 1 splits the channels
    into groups, each with its own attention over positions; the scale stays 1/sqrt(d) with d
    the full width, as in the authors' code (``CLS_Attention``: ``scale = dim_head ** -0.5``
    with ``dim_head`` the input width). ``qk_proj`` adds learnable query and key projections
    (the paper's appendix variant); the values stay the raw features F, so the output is always
    a convex combination of feature vectors ("soft masking followed by GAP", eq. 7).
    Returns the attended vector (B, d) and the pre-softmax logits (B, heads, p).
    """

    def __init__(self, dim: int, heads: int = 1, qk_proj: bool = False) -> None:
        super().__init__()
        self.dim, self.heads, self.scale = dim, heads, dim ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=False) if qk_proj else None
        self.k_proj = nn.Linear(dim, dim, bias=False) if qk_proj else None

    def forward(self, q: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, d = q.shape
        h, c = self.heads, d // self.heads
        tokens = features.flatten(2)  # (B, d, p): column i is the feature phi^i of position i
        if self.q_proj is None:
            logits = torch.einsum("bhc,bhcp->bhp", q.view(b, h, c), tokens.view(b, h, c, -1))
        else:
            # (W_k F)_head . (W_q q)_head == F . (W_k[head rows]^T (W_q q)_head): one d-vector per head
            qh = self.q_proj(q).view(b, h, c)
            q_eff = torch.einsum("bhc,hcd->bhd", qh, self.k_proj.weight.view(h, c, d))
            logits = torch.einsum("bhd,bdp->bhp", q_eff, tokens)
        logits = logits * self.scale
        attn = logits.softmax(dim=-1)
        out = torch.einsum("bhcp,bhp->bhc", tokens.view(b, h, c, -1), attn).reshape(b, d)
        return out, logits


class CaStream(Pooling):
    """CA-Stream pooling (ca-stream.txt, section 3.3, eq. 6 and 10; Figure 1).

    A learnable query q_0 of the first tapped stage's width d_0 is updated along the stages
    l = 0..L by ``q_{l+1} = W_l CA_l(q_l, F_l)`` (eq. 10), with ``CA_l`` the cross-attention of
    eq. 6 (no projections, no residual) and ``W_l`` a linear map to the next stage's width (to the
    classifier's input width after the last stage). ``q_{L+1}`` replaces GAP(F_L).

    The tap widths come from a timm model's ``feature_info`` (``backbone="resnet50"``: 64 -> 256
    -> 512 -> 1024 -> 2048 -> 2048, five blocks) or from ``channels``. ``forward`` takes the list
    of stage features (high to low resolution): either exactly the tapped ones or all stages of
    ``feature_info`` (then the last ``len(taps)`` are used). ``last_attention`` holds the last
    block's pre-softmax logits (mean over heads) reshaped to its feature grid (B, h, w).

    Decisions where the paper is silent, following the authors' code (``models/transformer.py``):
    q_0 ~ N(1, 1); ``W_l`` with bias, Xavier-uniform weights; scale 1/sqrt(d_l) also with heads.
    """

    multi_stage = True

    class Config(ComponentConfig):
        backbone: str | None = Field(
            "resnet50", description="timm model whose feature_info gives the stage widths (ignored if channels set)."
        )
        channels: list[int] | None = Field(
            None, description="Widths d_l of the stage features, high to low resolution (overrides backbone)."
        )
        out_features: int | None = Field(
            None, gt=0, description="Width of the pooled vector (classifier input); None = the model's num_features "
            "(last stage width when channels is given)."
        )
        single_block: bool = Field(False, description="Only one CA block, after the last stage (q_0 of its width).")
        heads: int = Field(1, gt=0, description="Attention heads per block (channel groups); must divide every width.")
        qk_proj: bool = Field(False, description="Learnable query/key projections in every block (appendix variant).")
        proj_bias: bool = Field(True, description="Bias in the projections W_l (the authors' code has one).")

        @model_validator(mode="after")
        def _check(self):
            if self.channels is None and not self.backbone:
                raise ValueError("give backbone (a timm model name) or channels (the stage widths)")
            if self.channels is not None and (not self.channels or min(self.channels) <= 0):
                raise ValueError(f"channels must be a non-empty list of positive widths, got {self.channels}")
            return self

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        cfg = self.config
        if cfg.channels is not None:
            stages, out = list(cfg.channels), cfg.out_features or cfg.channels[-1]
        else:
            widths, num_features = timm_stage_info(cfg.backbone)
            stages, out = list(widths), cfg.out_features or num_features
        self.num_stages = len(stages)
        widths = stages[-1:] if cfg.single_block else stages
        #: indices (into the stage list) of the stages the stream reads
        self.taps = list(range(self.num_stages - len(widths), self.num_stages))
        self.widths = widths
        bad = [d for d in widths if d % cfg.heads]
        if bad:
            raise InputError(f"ca-stream: heads={cfg.heads} must divide every stage width, not {bad} (widths {widths})")
        self.q0 = nn.Parameter(torch.normal(1.0, 1.0, (widths[0],)))
        self.blocks = nn.ModuleList(CrossAttention(d, cfg.heads, cfg.qk_proj) for d in widths)
        self.proj = nn.ModuleList(
            nn.Linear(d, nxt, bias=cfg.proj_bias) for d, nxt in zip(widths, [*widths[1:], out])
        )
        for lin in self.proj:
            nn.init.xavier_uniform_(lin.weight)
        self._out = out

    @property
    def out_features(self) -> int:
        return self._out

    def forward(self, features: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        feats = [features] if isinstance(features, torch.Tensor) else list(features)
        if len(feats) == self.num_stages and len(self.taps) != self.num_stages:
            feats = [feats[i] for i in self.taps]
        if len(feats) != len(self.widths):
            raise InputError(
                f"ca-stream: expected {len(self.widths)} stage feature maps of widths {self.widths} "
                f"(or all {self.num_stages} stages), got {len(feats)}"
            )
        for i, (x, d) in enumerate(zip(feats, self.widths)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != d:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise InputError(f"ca-stream: stage {i}: expected features (B, {d}, h, w), got {got}")
        x0 = feats[0]
        q = self.q0.to(x0.dtype).expand(x0.shape[0], -1)
        logits = None
        for block, proj, x in zip(self.blocks, self.proj, feats):
            attended, logits = block(q, x)
            q = proj(attended)  # eq. 10, no residual
        h, w = feats[-1].shape[-2:]
        self.last_attention = logits.detach().mean(1).reshape(-1, h, w)
        return q


# --- classifiers ----------------------------------------------------------------------------

class TimmClassifier(Model):
    """A timm image classifier with GAP (``gap-classifier``) or with CA-Stream replacing GAP in
    front of the unchanged classifier head (``ca-stream-classifier``; ca-stream.txt, eq. 8-10:
    ``f = g o GAP o f_L o ... o f_0`` becomes ``g(q_{L+1})``).

    The stage features are read with forward hooks on the modules named by the timm model's
    ``feature_info`` (ResNet: stem, layer1..4; ConvNeXt: stages.0..3), so any timm model with a
    feature_info and ``forward_head`` works. The head g is timm's own ``forward_head`` applied to
    q as a 1x1 feature map: its global pooling over one position is the identity, so g is exactly
    what follows GAP in the timm model (ConvNeXt: LayerNorm and fc; ResNet: fc).

    ResNet stem tap: after the max-pool (stride 4) as in the authors' code, not timm's ``act1``
    (stride 2); same width 64. ConvNeXt taps are timm's stage outputs (the authors tap after the
    stem and after each down-sampling); the widths, hence the stream's parameters, are the same.

    The GAP model's ``forward`` is the timm model's own. :func:`wrap_classifier` puts CA-Stream
    around a given timm classifier (or ``gap-classifier``) sharing its modules. Grad-CAM and
    other CAM explainers use ``model.target_layer`` (``"net.layer4"``, ``"net.stages.3"``),
    the same for both poolings.
    """

    task = "classification"

    class Config(ComponentConfig):
        model_name: str = Field("resnet50", description="timm classifier name (random init; see weights).")
        num_classes: int = Field(1000, gt=0, description="Number of classes of the classifier head.")
        model_kwargs: dict[str, Any] = Field(
            default_factory=dict, description="Extra timm.create_model arguments, e.g. {'channels': [16, 32, 64, 128]}."
        )
        weights: str | None = Field(None, description="Local weights file (.safetensors/.pth) of the timm classifier.")
        pooling: Literal["gap", "ca-stream"] = Field("gap", description="Global pooling in front of the head.")
        single_block: bool = Field(False, description="CA-Stream: one CA block after the last stage only.")
        heads: int = Field(1, gt=0, description="CA-Stream: attention heads per block.")
        qk_proj: bool = Field(False, description="CA-Stream: learnable query/key projections.")
        proj_bias: bool = Field(True, description="CA-Stream: bias in the projections W_l.")

    def __init__(self, config: Any = None, *, net: nn.Module | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        cfg = self.config
        if net is None:
            import timm

            try:
                net = timm.create_model(cfg.model_name, pretrained=False, num_classes=cfg.num_classes,
                                        **cfg.model_kwargs)
            except (RuntimeError, TypeError) as e:
                raise InputError(f"cannot build timm model {cfg.model_name!r} with {cfg.model_kwargs}: {e}") from e
            if cfg.weights:
                load_weights(net, read_state_dict(cfg.weights), source=cfg.weights)
        info = getattr(net, "feature_info", None)
        if not info or not hasattr(net, "forward_head"):
            raise InputError(f"{type(net).__name__} is not a timm classifier with feature_info and forward_head")
        self.net = net
        modules = [str(f["module"]) for f in info]
        if modules[0] == "act1" and isinstance(getattr(net, "maxpool", None), nn.MaxPool2d):
            modules[0] = "maxpool"  # ResNet stem tap after the max-pool, as in the authors' code
        self.pool: CaStream | None = None
        self.tap_modules: list[str] = []
        if cfg.pooling == "ca-stream":
            self.pool = CaStream(
                backbone=None, channels=[int(f["num_chs"]) for f in info], out_features=int(net.num_features),
                single_block=cfg.single_block, heads=cfg.heads, qk_proj=cfg.qk_proj, proj_bias=cfg.proj_bias,
            )
            self.tap_modules = [modules[i] for i in self.pool.taps]
        self.target_layer = "net." + str(info[-1]["module"])

    @property
    def last_attention(self) -> torch.Tensor | None:
        return None if self.pool is None else self.pool.last_attention

    def stream_parameters(self) -> list[nn.Parameter]:
        """The trainable CA-Stream parameters (q_0, W_l, optional projections)."""
        return [] if self.pool is None else list(self.pool.parameters())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.pool is None:
            return self.net(images)
        check_images(images, channels=None)
        feats: dict[int, torch.Tensor] = {}
        handles = [
            resolve_layer(self.net, name).register_forward_hook(lambda m, i, o, k=k: feats.__setitem__(k, o))
            for k, name in enumerate(self.tap_modules)
        ]
        try:
            self.net.forward_features(images)
        finally:
            for h in handles:
                h.remove()
        q = self.pool([feats[k] for k in range(len(self.tap_modules))])
        return self.net.forward_head(q[:, :, None, None])


def wrap_classifier(classifier: nn.Module, pooling: str = "ca-stream", **options: Any) -> TimmClassifier:
    """Put a pooling around a timm classifier (or the ``net`` of a ``gap-classifier``) that it
    shares, not copies: ``wrap_classifier(timm.create_model("resnet50"))`` is a
    ``ca-stream-classifier`` whose backbone and head are the given model's modules. ``options``
    are :class:`TimmClassifier` config fields (``heads``, ``single_block``, ``model_kwargs`` ...). The result
    can be saved with ``foveal.save``: it is rebuilt from the timm architecture name and
    ``model_kwargs`` (give the ones the timm model was created with)."""
    net = classifier.net if isinstance(classifier, TimmClassifier) else classifier
    if isinstance(classifier, TimmClassifier):
        options.setdefault("model_kwargs", classifier.config.model_kwargs)
    cfg = getattr(net, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not name or not hasattr(net, "num_classes"):
        raise InputError(f"wrap_classifier: expected a timm classifier, got {type(net).__name__}")
    model = TimmClassifier(model_name=name, num_classes=int(net.num_classes), pooling=pooling, net=net, **options)
    model.registry_name = f"{pooling}-classifier"
    return model
