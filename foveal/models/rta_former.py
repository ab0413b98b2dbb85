"""RTA-Former (Li, Yi, Uneri, Niu & Jones, "RTA-Former: Reverse Transformer Attention for Polyp
Segmentation", EMBC 2024; ``rta-former.txt``): a PVTv2 encoder, a Hierarchical Feature
Synthesizer (HFS) of Reverse Transformer Attention (RTA) modules and a fusion decoder.

Design (section numbers refer to the paper; the authors' code is not public, so where the text
is ambiguous the choice below is the one that is consistent with the text *and* with the
parameter counts of Table I):

* **Channel upscaling (II.B).** Each encoder output X_i (channels C_i) passes a 3x3
  conv-BN-ReLU to a common decoder width D, by default the widest encoder channel (512 for
  PVTv2-B1..B5, 256 for B0): the feature X_i the HFS and decoder work on.
* **RTA (II.D, eq. 2-3, Fig. 2).** For the pair (X_i, X_{i+1}):
  ``G = Resize(Stage_{i+1}(Conv(X_{i+1})))`` where Conv is a 1x1 convolution aligning D to the
  stage's width C_{i+1} and Stage_{i+1} is a copy of the backbone's transformer stage i+1 (its
  blocks and final LayerNorm, not its patch embedding), run at X_{i+1}'s own resolution so its
  spatial-reduction attention sees the sizes it was built for; Resize is bilinear to X_i's size.
  ``X_{i+1,reverse} = 1 - sigmoid(Bottleneck_1(G))``: eq. 2 writes ``BN_1``; Fig. 2 and section
  III.G name this block "Bottleneck 1" (three convolutions whose output "is reversed and
  subsequently fed into Bottleneck 2"), so BN_1 is read as Bottleneck_1 (1x1 C_{i+1}->D/4, 3x3,
  1x1 ->D, BN after each, ReLU between), and the "attention map" subtracted from unity is its
  sigmoid, as in PraNet's reverse attention. ``X_{i,output} = Bottleneck_2(X_i * X_{i+1,reverse})
  + X_i`` (eq. 3). The deepest level has no X_{i+1}; it is guided by itself through the same
  conv / bottleneck path without a transformer stage (every backbone stage is already used by
  the level below it).
* **HFS (II.C, Fig. 1)** applies one RTA per level. ``hfs_depth`` stacks such synthesizer rounds
  (round r refines round r-1's outputs, each with its own stage copies).
* **Decoder (II.E, eq. 4-5).** ``X_fused,i = Resize(FF(X_i, X_{i,output}))`` to X_1's size, with
  the fast fusion of eq. 1 (EfficientDet: weights ReLU-clipped and normalised by their sum +
  1e-4, then Swish). ``M = Up(Conv(Cat(...)))``: the convolution is a 1x1 conv-BN-ReLU to D
  followed by a 1x1 classifier to ``num_classes``; Up is bilinear to the input size.

Parameter counts (Table I: 8.4 / 56.2 / 192.6 / 250.8 M). PVTv2 B0/B2/B4/B5 feature extractors
hold 3.41 / 24.85 / 62.04 / 81.44 M. Table I minus the encoder leaves 5.0 / 31.4 / 130.6 /
169.4 M, i.e. about one further copy of the backbone's transformer stages for T and S and two for
M and L, plus a few million decoder parameters. The design above holds one copy of stages 2-4
per synthesizer round, so T and S use ``hfs_depth=1`` and M and L ``hfs_depth=2``; with D = the
widest channel this gives 8.33 / 55.41 / 191.78 / 250.20 M (-0.8 / -1.4 / -0.4 / -0.2 %). The
paper does not say why M/L differ; a second synthesizer round is the only reading of "HFS ...
integrates multiple transformer stages" we found that reproduces all four counts.
The RTA stage copies start from the backbone's (pre-trained) stage weights: the text calls them
"the transformer stage of the backbone".

Ablation (Table III): ``variant="none"`` (no HFS: X_fused,i = Resize(FF(X_i))),
``"hfs"`` (HFS of residual bottlenecks without attention: X_i + Bottleneck_2(X_i)),
``"ra"`` (HFS + convolutional reverse attention as in CaraNet/PraNet: a 1x1 conv of X_{i+1}
gives a one-channel coarse map, reversed as 1 - sigmoid and broadcast over channels),
``"rta"`` (HFS + RTA, the default).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..core.config import ComponentConfig
from ..core.decoder import Decoder
from ..core.errors import InputError
from ..core.model import Model
from ..core.tensors import check_images
from .backbones import build_backbone

Variant = Literal["none", "hfs", "ra", "rta"]


def conv_bn(cin: int, cout: int, kernel: int, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Bottleneck(nn.Sequential):
    """ResNet-style bottleneck (1x1 -> 3x3 -> 1x1, BN after each, ReLU between; Fig. 4 shows its
    three convolutions). No activation at the end: its output is either reversed (Bottleneck_1)
    or added to the residual (Bottleneck_2, eq. 3)."""

    def __init__(self, cin: int, cout: int, reduction: int = 4) -> None:
        mid = max(cout // reduction, 1)
        super().__init__(conv_bn(cin, mid, 1), conv_bn(mid, mid, 3), conv_bn(mid, cout, 1, relu=False))


class FastFeatureFusion(nn.Module):
    """Eq. 1: ``Swish(sum_i w_i x_i)`` with EfficientDet's fast normalised fusion
    ``w_i = relu(v_i) / (eps + sum_j relu(v_j))`` of learnable ``v`` (initialised to 1)."""

    def __init__(self, n: int, eps: float = 1e-4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def normalized_weights(self) -> torch.Tensor:
        w = F.relu(self.weight)
        return w / (w.sum() + self.eps)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        if len(xs) != self.weight.numel():
            raise InputError(f"FastFeatureFusion: expected {self.weight.numel()} features, got {len(xs)}")
        w = self.normalized_weights()
        return F.silu(sum(w[i] * x for i, x in enumerate(xs)))


class TransformerStage(nn.Module):
    """A PVTv2 stage without patch embedding (blocks + LayerNorm) on NCHW maps, built with timm's
    ``PyramidVisionTransformerStage`` so its weights are key-compatible with the backbone's."""

    def __init__(self, dim: int, depth: int, num_heads: int, sr_ratio: int, mlp_ratio: float) -> None:
        super().__init__()
        from timm.models.pvt_v2 import PyramidVisionTransformerStage

        self.stage = PyramidVisionTransformerStage(
            dim, dim, depth, downsample=False, num_heads=num_heads, sr_ratio=sr_ratio, mlp_ratio=mlp_ratio
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(x.permute(0, 2, 3, 1))  # timm takes NHWC without downsample, returns NCHW


class ReverseTransformerAttention(nn.Module):
    """RTA (section II.D, eq. 2-3, Fig. 2); with ``stage=None`` the guide path has no transformer
    (used for the deepest level, whose guide is itself)."""

    def __init__(self, width: int, guide_dim: int, stage: TransformerStage | None) -> None:
        super().__init__()
        self.align = nn.Conv2d(width, guide_dim, 1)
        self.stage = stage
        self.bottleneck1 = Bottleneck(guide_dim, width)
        self.bottleneck2 = Bottleneck(width, width)

    def reverse_map(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        g = self.align(guide)
        if self.stage is not None:
            g = self.stage(g)
        g = F.interpolate(g, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return 1.0 - torch.sigmoid(self.bottleneck1(g))  # eq. 2

    def forward(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        return self.bottleneck2(x * self.reverse_map(x, guide)) + x  # eq. 3


class ConvReverseAttention(nn.Module):
    """Convolutional reverse attention (PraNet / CaraNet, the "RA" row of Table III): the deeper
    level predicts a one-channel coarse map, ``1 - sigmoid`` of it (resized) gates X_i."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.coarse = nn.Conv2d(width, 1, 1)
        self.bottleneck2 = Bottleneck(width, width)

    def reverse_map(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        a = F.interpolate(self.coarse(guide), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return 1.0 - torch.sigmoid(a)

    def forward(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        return self.bottleneck2(x * self.reverse_map(x, guide)) + x


class ResidualRefine(nn.Module):
    """HFS without attention (the "HFS" row of Table III): ``X_i + Bottleneck_2(X_i)``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.bottleneck2 = Bottleneck(width, width)

    def forward(self, x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        return self.bottleneck2(x) + x


class RTAFormerDecoder(Decoder):
    """RTA-Former decoder: 3x3 channel upscaling (II.B), Hierarchical Feature Synthesizer of
    Reverse Transformer Attention modules (II.C-D, eq. 2-3), fast feature fusion (II.A, eq. 1)
    and fusion head (II.E, eq. 4-5). Works on any backbone's feature list; with a PVTv2 backbone
    the RTA transformer stages copy its stage settings (and, in ``rta-former-*``, its weights).
    See the module docstring for the design decisions."""

    class Config(ComponentConfig):
        channels: list[int] = Field(
            [64, 128, 320, 512], min_length=2, description="Encoder channels C_i, high to low resolution."
        )
        num_classes: int = Field(1, ge=1, description="Output channels (1 = binary polyp logits).")
        width: int | None = Field(None, ge=1, description="Decoder width D after upscaling; None = max(channels).")
        variant: Variant = Field("rta", description="Table III ablation: none, hfs, ra (conv RA), rta.")
        hfs_depth: int = Field(1, ge=1, description="Stacked HFS rounds (1 for RTA-Former-T/S, 2 for -M/L).")
        stage_depths: list[int] | None = Field(
            None, description="Transformer blocks of the RTA stage per level (None = 2 each)."
        )
        num_heads: list[int] | None = Field(None, description="Attention heads per level (None = C_i // 64, min 1).")
        sr_ratios: list[int] | None = Field(
            None, description="Spatial-reduction ratios per level (None = 8, 4, 2, 1 for the last four levels)."
        )
        mlp_ratios: list[float] | None = Field(None, description="MLP expansion per level (None = 4).")

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        cfg = self.config
        n = len(cfg.channels)
        for field in ("stage_depths", "num_heads", "sr_ratios", "mlp_ratios"):
            value = getattr(cfg, field)
            if value is not None and len(value) != n:
                raise InputError(f"rta-former-decoder: {field} needs {n} entries (one per level), got {value}")
        width = cfg.width or max(cfg.channels)
        self.width = width
        self.lateral = nn.ModuleList(conv_bn(c, width, 3) for c in cfg.channels)
        self.rounds = nn.ModuleList()
        if cfg.variant != "none":
            for _ in range(cfg.hfs_depth):
                self.rounds.append(nn.ModuleList(self._hfs_module(i) for i in range(n)))
        self.fusion = nn.ModuleList(FastFeatureFusion(1 if cfg.variant == "none" else 2) for _ in range(n))
        self.head = nn.Sequential(conv_bn(n * width, width, 1), nn.Conv2d(width, cfg.num_classes, 1))

    def stage_settings(self, level: int) -> dict[str, Any]:
        cfg = self.config
        c = cfg.channels[level]
        n = len(cfg.channels)
        heads = cfg.num_heads[level] if cfg.num_heads else _divisor_at_most(c, max(c // 64, 1))
        sr = cfg.sr_ratios[level] if cfg.sr_ratios else 2 ** max(min(n - 1 - level, 3), 0)
        return {
            "depth": cfg.stage_depths[level] if cfg.stage_depths else 2,
            "num_heads": heads,
            "sr_ratio": sr,
            "mlp_ratio": cfg.mlp_ratios[level] if cfg.mlp_ratios else 4.0,
        }

    def _hfs_module(self, level: int) -> nn.Module:
        variant, n = self.config.variant, len(self.config.channels)
        if variant == "hfs":
            return ResidualRefine(self.width)
        if variant == "ra":
            return ConvReverseAttention(self.width)
        if level == n - 1:  # deepest level: self-guided, no stage left to copy
            return ReverseTransformerAttention(self.width, self.config.channels[level], None)
        guide = level + 1
        stage = TransformerStage(self.config.channels[guide], **self.stage_settings(guide))
        return ReverseTransformerAttention(self.width, self.config.channels[guide], stage)

    def rta_stages(self) -> list[tuple[int, TransformerStage]]:
        """(encoder level, stage) for every RTA transformer stage, over all HFS rounds."""
        out = []
        for modules in self.rounds:
            for level, m in enumerate(modules):
                if isinstance(m, ReverseTransformerAttention) and m.stage is not None:
                    out.append((level + 1, m.stage))
        return out

    def synthesize(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(X_i after channel upscaling, X_{i,output} after the HFS rounds)."""
        if len(features) != len(self.lateral):
            raise InputError(
                f"rta-former-decoder: expected {len(self.lateral)} feature maps, got {len(features)}"
            )
        for i, (f, c) in enumerate(zip(features, self.config.channels)):
            if f.dim() != 4 or f.shape[1] != c:
                raise InputError(f"rta-former-decoder: feature {i} should be (B, {c}, h, w), got {tuple(f.shape)}")
        xs = [lat(f) for lat, f in zip(self.lateral, features)]
        ys = xs
        for modules in self.rounds:
            n = len(ys)
            ys = [m(ys[i], ys[min(i + 1, n - 1)]) for i, m in enumerate(modules)]
        return xs, ys

    def forward(self, features: list[torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        xs, ys = self.synthesize(features)
        size = xs[0].shape[-2:]
        fused = []
        for i, ff in enumerate(self.fusion):
            parts = [xs[i]] if self.config.variant == "none" else [xs[i], ys[i]]
            fused.append(F.interpolate(ff(parts), size=size, mode="bilinear", align_corners=False))  # eq. 4
        logits = self.head(torch.cat(fused, dim=1))  # eq. 5
        return F.interpolate(logits, size=tuple(image_size), mode="bilinear", align_corners=False)


def _divisor_at_most(c: int, h: int) -> int:
    while c % h:
        h -= 1
    return h


class RTAFormer(Model):
    """RTA-Former (rta-former.txt, sections II.A-E, Table I): backbone (PVTv2-B0/B2/B4/B5 for
    T/S/M/L, or any registered backbone) + :class:`RTAFormerDecoder`. ``forward`` returns logits
    (B, num_classes, H, W) at the input size. The RTA transformer stages are initialised from the
    backbone's stages (after ``backbone_weights`` are loaded) when the backbone is a PVTv2."""

    task = "segmentation"

    class Config(ComponentConfig):
        backbone: str = Field("pvt-v2-b2", description="Registered backbone name (pvt-v2-b0 ... b5, timm-backbone).")
        backbone_options: dict[str, Any] = Field(
            {}, description="Extra backbone config, e.g. {'model_name': 'resnet50'} for timm-backbone."
        )
        backbone_weights: str | None = Field(None, description="Local weights file for the backbone.")
        num_classes: int = Field(1, ge=1, description="Output channels (1 = binary polyp logits).")
        variant: Variant = Field("rta", description="Decoder variant of the Table III ablation.")
        hfs_depth: int = Field(1, ge=1, description="Stacked HFS rounds (1 for T/S, 2 for M/L; see module docs).")
        width: int | None = Field(None, ge=1, description="Decoder width D; None = widest encoder channel.")

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        cfg = self.config
        self.backbone = build_backbone(cfg.backbone, cfg.backbone_options, cfg.backbone_weights, owner="rta-former")
        channels = list(self.backbone.channels)
        stage_kwargs: dict[str, Any] = {}
        if hasattr(self.backbone, "stage_settings"):
            settings = [self.backbone.stage_settings(i) for i in range(len(channels))]
            stage_kwargs = {
                "stage_depths": [s["depth"] for s in settings],
                "num_heads": [s["num_heads"] for s in settings],
                "sr_ratios": [s["sr_ratio"] for s in settings],
                "mlp_ratios": [s["mlp_ratio"] for s in settings],
            }
        self.decoder = RTAFormerDecoder(
            channels=channels, num_classes=cfg.num_classes, width=cfg.width, variant=cfg.variant,
            hfs_depth=cfg.hfs_depth, **stage_kwargs,
        )
        if hasattr(self.backbone, "stage"):
            self.copy_backbone_stages()

    def copy_backbone_stages(self) -> None:
        """Initialise every RTA stage from the backbone stage of the same level (blocks + norm)."""
        for level, stage in self.decoder.rta_stages():
            source = self.backbone.stage(level).state_dict()
            state = {k: v for k, v in source.items() if not k.startswith("downsample.")}
            stage.stage.load_state_dict(state)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        return self.decoder(self.backbone(images), tuple(images.shape[-2:]))


SIZES = {"t": ("pvt-v2-b0", 1), "s": ("pvt-v2-b2", 1), "m": ("pvt-v2-b4", 2), "l": ("pvt-v2-b5", 2)}
