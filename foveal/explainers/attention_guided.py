"""Attention-map-guided CAM (attention-guided-cam.txt sections 3.1-3.2, eq. 1-7)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..core.checkpoint import read_state_dict
from ..core.errors import CheckpointError, InputError
from .cam import CAMConfig, Reshape
from .gradient_cams import GradientCAMBase


class AttentionGuidedCAM(GradientCAMBase):
    """Attention map-guided CAM (attention-guided-cam.txt sections 3.1-3.2, eq. 1-7): the
    Grad-CAM-weighted feature maps ``F_k = w_k A^k`` (eq. 2-4) pass a channel attention
    ``Mc(F) = sigma(MLP(AvgPool(F)) + MLP(MaxPool(F)))`` (eq. 6) and then a spatial attention
    ``Ms(F') = sigma(f7x7([AvgPool_c(F'); MaxPool_c(F')]))`` (eq. 7), applied sequentially as in
    CBAM (Woo et al. 2018): ``F' = Mc(F) * F``, ``F'' = Ms(F') * F'``; map ``ReLU(sum_k F''_k)``.

    The paper does not say where the MLP and convolution weights come from. Two modes:

    * ``channels=None`` (default, needs no training): the MLP is the identity MLP of a CBAM with
      reduction 1 (``W1 = W2 = I``, zero biases, so ``MLP(x) = ReLU(x)``) and the 7 x 7 filter
      averages the two pooled maps with a normalised Gaussian of std ``sigma`` (replicate padding).
      Because sigmoids saturate, each attention's input is divided by its per-image maximum
      magnitude, making the default invariant to the scale of the gradients. Both attentions are
      then monotone in the Grad-CAM evidence: they sharpen it without training.
    * ``channels=C``: a CBAM module (``mlp.0`` Linear C -> C/reduction, ReLU, ``mlp.2`` Linear
      back to C; ``conv`` Conv2d 2 -> 1, kernel_size, zero padding) applied to the raw features,
      with weights from ``weights`` (a local .safetensors/.pth file with those keys), from
      ``load_state_dict``, or trained by the user on ``explainer.attention``. These tensors are the
      explainer's state, so ``foveal.save``/``foveal.load`` keep them.
    """

    class Config(CAMConfig):
        channels: int | None = Field(
            None, ge=1,
            description="Channels C of the target layer for trained CBAM weights; None = training-free default.",
        )
        reduction: int = Field(16, ge=1, description="MLP reduction ratio r (hidden C // r) of the trained module.")
        kernel_size: int = Field(7, ge=1, description="Spatial attention kernel size (7 in eq. 7); odd.")
        sigma: float = Field(1.0, gt=0, description="Std of the Gaussian of the training-free spatial attention.")
        weights: str | None = Field(None, description="Local file with trained attention weights (needs channels).")

    def __init__(self, config: Any = None, *, reshape: Reshape | None = None, **overrides: Any) -> None:
        super().__init__(config, reshape=reshape, **overrides)
        cfg = self.config
        if cfg.kernel_size % 2 == 0:
            raise InputError(f"attention-guided-cam: kernel_size must be odd, got {cfg.kernel_size}")
        self.attention: nn.Module | None = None
        if cfg.channels is not None:
            hidden = max(1, cfg.channels // cfg.reduction)
            att = nn.Module()
            att.mlp = nn.Sequential(nn.Linear(cfg.channels, hidden), nn.ReLU(), nn.Linear(hidden, cfg.channels))
            att.conv = nn.Conv2d(2, 1, cfg.kernel_size, padding=cfg.kernel_size // 2)
            self.attention = att
            if cfg.weights:
                self.load_state_dict(read_state_dict(cfg.weights))
        elif cfg.weights:
            raise InputError("attention-guided-cam: weights needs channels=C (the target layer's channel count)")

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.attention is None:
            return {}
        return {k: v.detach() for k, v in self.attention.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> Any:
        if self.attention is None:
            return super().load_state_dict(state, strict)
        try:
            return self.attention.load_state_dict(dict(state), strict=strict)
        except RuntimeError as e:
            raise CheckpointError(f"attention-guided-cam: the weights do not fit the attention module: {e}") from e

    def combine(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        f = g.mean(dim=(2, 3), keepdim=True) * a
        if self.attention is None:
            f = f * self._default_channel(f)
            f = f * self._default_spatial(f)
        else:
            f = f * self._trained_channel(f)
            f = f * self._trained_spatial(f)
        return F.relu(f.sum(1))

    @staticmethod
    def _scaled(x: torch.Tensor) -> torch.Tensor:
        s = x.abs().flatten(1).amax(1).clamp_min(torch.finfo(x.dtype).tiny)
        return x / s.view(-1, *([1] * (x.dim() - 1)))

    def _default_channel(self, f: torch.Tensor) -> torch.Tensor:
        pooled = self._scaled(torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], 1))
        avg, mx = pooled.chunk(2, dim=1)
        return torch.sigmoid(F.relu(avg) + F.relu(mx))[..., None, None]

    def _default_spatial(self, f: torch.Tensor) -> torch.Tensor:
        k = self.config.kernel_size
        r = torch.arange(k, dtype=f.dtype, device=f.device) - k // 2
        g1 = torch.exp(-(r**2) / (2 * self.config.sigma**2))
        kernel = torch.outer(g1, g1)
        kernel = (kernel / kernel.sum() / 2).expand(1, 2, k, k)
        pooled = self._scaled(torch.cat([f.mean(1, keepdim=True), f.amax(1, keepdim=True)], 1))
        pooled = F.pad(pooled, (k // 2,) * 4, mode="replicate")
        return torch.sigmoid(F.conv2d(pooled, kernel))

    def _trained_channel(self, f: torch.Tensor) -> torch.Tensor:
        mlp = self.attention.mlp
        if f.shape[1] != mlp[0].in_features:
            raise InputError(
                f"attention-guided-cam: the attention module was built for {mlp[0].in_features} channels, "
                f"the target layer has {f.shape[1]}"
            )

        def run(x: torch.Tensor) -> torch.Tensor:
            h = F.relu(F.linear(x, mlp[0].weight.to(x), mlp[0].bias.to(x)))
            return F.linear(h, mlp[2].weight.to(x), mlp[2].bias.to(x))

        return torch.sigmoid(run(f.mean(dim=(2, 3))) + run(f.amax(dim=(2, 3))))[..., None, None]

    def _trained_spatial(self, f: torch.Tensor) -> torch.Tensor:
        conv = self.attention.conv
        pooled = torch.cat([f.mean(1, keepdim=True), f.amax(1, keepdim=True)], 1)
        return torch.sigmoid(F.conv2d(pooled, conv.weight.to(f), conv.bias.to(f), padding=conv.padding))
