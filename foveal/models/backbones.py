"""Backbones: any timm model with ``features_only`` support (and the PVTv2 family)."""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from pydantic import Field

from ..core.backbone import Backbone
from ..core.checkpoint import load_weights, read_state_dict
from ..core.config import ComponentConfig
from ..core.errors import InputError
from ..core.tensors import check_images


class TimmFeatures(Backbone):
    """Shared part of the backbones that wrap a timm ``features_only`` model in ``self.body``:
    channels and strides from timm's ``feature_info``, and the checked forward."""

    input_channels: int | None = None  # None: any number of input channels

    @property
    def channels(self) -> list[int]:
        return list(self.body.feature_info.channels())

    @property
    def strides(self) -> list[int]:
        return list(self.body.feature_info.reduction())

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        check_images(images, channels=self.input_channels)
        return list(self.body(images))


class TimmBackbone(TimmFeatures):
    """Any timm model that supports ``features_only`` (ResNet, ConvNeXt, EfficientNet, ...),
    so decoders and poolings work on other encoders too. Weights never download: pass a local
    ``weights`` file (timm ``.safetensors``/``.pth`` of the classifier; its classifier head keys,
    from timm's ``pretrained_cfg['classifier']``, are dropped; every other missing or unexpected
    key is an error that lists them)."""

    class Config(ComponentConfig):
        model_name: str = Field("resnet50", description="timm model name, e.g. resnet50, convnext_tiny.")
        out_indices: list[int] | None = Field(
            None, description="Feature levels to return (timm out_indices); None = all."
        )
        weights: str | None = Field(None, description="Local weights file (.safetensors/.pth) of the timm model.")

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        import timm

        cfg = self.config
        kwargs = {"features_only": True, "pretrained": False}
        if cfg.out_indices is not None:
            kwargs["out_indices"] = tuple(cfg.out_indices)
        try:
            self.body = timm.create_model(cfg.model_name, **kwargs)
        except RuntimeError as e:
            raise InputError(f"timm-backbone: cannot build {cfg.model_name!r} with features_only: {e}") from e
        if cfg.weights:
            self.load_timm_weights(cfg.weights)

    def load_timm_weights(self, path: str) -> None:
        state = read_state_dict(path)
        head = getattr(self.body, "pretrained_cfg", {}).get("classifier") or ""
        heads = (head,) if isinstance(head, str) else tuple(head)
        state = {k: v for k, v in state.items() if not any(h and k.startswith(h + ".") for h in heads)}
        own = self.body.state_dict()
        # features_only models keep the original module names; drop stages they do not return
        state = {k: v for k, v in state.items() if k in own or not _unused_stage(k, own)}
        load_weights(self.body, state, source=str(path))



def _unused_stage(key: str, own: dict) -> bool:
    """True for keys of top-level modules the features_only model removed (e.g. layer4 when
    out_indices stops earlier), so they are not reported as unexpected."""
    top = key.split(".")[0]
    return not any(k.split(".")[0] == top for k in own)


# --- PVTv2 -----------------------------------------------------------------------------------

PVT_VARIANTS = ("b0", "b1", "b2", "b3", "b4", "b5")


class PVTv2Backbone(TimmFeatures):
    """Pyramid Vision Transformer v2 (Wang et al., "PVT v2: Improved Baselines with Pyramid
    Vision Transformer", CVM 2022), the encoder of Polyp-PVT and RTA-Former (rta-former.txt,
    section II.B): overlapping convolutional patch embeddings, spatial-reduction attention and
    depth-wise-convolution feed-forward layers; four feature maps at strides 4/8/16/32 with
    channels [32, 64, 160, 256] (B0) or [64, 128, 320, 512] (B1-B5).

    Built on timm's ``pvt_v2_b*`` with ``features_only``. Local ``weights`` may be the official
    PVTv2 release (``pvt_v2_b2.pth``: ``patch_embed1..4``, ``block1..4``, ``norm1..4``, ``head``),
    a timm classifier checkpoint (``stages.N``, ``.safetensors`` or ``.pth``) or this backbone's
    own state dict; keys are mapped to timm's feature model, the classifier ``head`` is dropped,
    and any other missing or unexpected key raises :class:`CheckpointError` listing them."""

    input_channels = 3

    class Config(ComponentConfig):
        variant: Literal["b0", "b1", "b2", "b3", "b4", "b5"] = Field("b2", description="PVTv2 size (B0-B5).")
        weights: str | None = Field(
            None, description="Local weights file: official PVTv2 .pth, timm .safetensors/.pth, or foveal."
        )
        drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0, description="Stochastic depth rate of the blocks.")

    def __init__(self, config=None, **overrides) -> None:
        super().__init__(config, **overrides)
        import timm

        cfg = self.config
        self.body = timm.create_model(
            f"pvt_v2_{cfg.variant}", pretrained=False, features_only=True, drop_path_rate=cfg.drop_path_rate
        )
        if cfg.weights:
            self.load_pvt_weights(cfg.weights)

    def load_pvt_weights(self, path: str) -> None:
        """Load an official / timm / foveal PVTv2 weight file (see the class docstring)."""
        state = map_pvt_keys(read_state_dict(path))
        load_weights(self.body, state, source=str(path))


    def stage(self, index: int) -> torch.nn.Module:
        """The timm ``PyramidVisionTransformerStage`` producing feature level ``index`` (0-3)."""
        return getattr(self.body, f"stages_{index}")

    def stage_settings(self, index: int) -> dict[str, float | int]:
        """Hyper-parameters of stage ``index``: depth, num_heads, sr_ratio, mlp_ratio."""
        blocks = self.stage(index).blocks
        attn = blocks[0].attn
        sr = getattr(attn, "sr", None)
        return {
            "depth": len(blocks),
            "num_heads": int(attn.num_heads),
            "sr_ratio": int(sr.kernel_size[0]) if sr is not None else 1,
            "mlp_ratio": blocks[0].mlp.fc1.out_features / blocks[0].mlp.fc1.in_features,
        }



def map_pvt_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename PVTv2 weight keys to timm's ``features_only`` layout.

    official ``patch_embed1.*`` -> ``patch_embed.*``; ``patch_embed{k}.*`` -> ``stages_{k-1}.downsample.*``
    (k = 2..4); ``block{k}.{j}.*`` -> ``stages_{k-1}.blocks.{j}.*``; ``norm{k}.*`` -> ``stages_{k-1}.norm.*``;
    ``mlp.dwconv.dwconv`` -> ``mlp.dwconv``. timm classifier: ``stages.{i}.*`` -> ``stages_{i}.*``.
    A foveal backbone checkpoint (``body.*``) loses its prefix. ``head.*`` is dropped."""
    out = {}
    for key, value in state.items():
        k = key[len("body."):] if key.startswith("body.") else key
        if k.startswith("head."):
            continue
        k = re.sub(r"^patch_embed1\.", "patch_embed.", k)
        k = re.sub(r"^patch_embed([2-4])\.", lambda m: f"stages_{int(m.group(1)) - 1}.downsample.", k)
        k = re.sub(r"^block([1-4])\.(\d+)\.", lambda m: f"stages_{int(m.group(1)) - 1}.blocks.{m.group(2)}.", k)
        k = re.sub(r"^norm([1-4])\.", lambda m: f"stages_{int(m.group(1)) - 1}.norm.", k)
        k = re.sub(r"^stages\.(\d+)\.", r"stages_\1.", k)
        k = k.replace(".dwconv.dwconv.", ".dwconv.")
        out[k] = value
    return out


def build_backbone(name: str, options: dict[str, Any] | None = None, weights: str | None = None, *,
                   owner: str) -> Backbone:
    """Build the registered backbone ``name`` for a composite component (``owner`` names it in
    errors); ``weights`` is passed as the backbone's ``weights`` file."""
    from .. import registry

    options = dict(options or {})
    if weights:
        options["weights"] = weights
    backbone = registry.build(name, **options)
    if getattr(backbone, "kind", None) != "backbone":
        raise InputError(f"{owner}: {name!r} is a {getattr(backbone, 'kind', type(backbone).__name__)}, "
                         "expected a backbone")
    return backbone
