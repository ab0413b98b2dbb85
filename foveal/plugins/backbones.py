"""Backbones: any timm model with ``features_only`` support (and the PVTv2 family)."""

from __future__ import annotations

import torch
from pydantic import Field

from ..core.backbone import Backbone
from ..core.checkpoint import load_weights, read_state_dict
from ..core.config import ComponentConfig
from ..core.errors import InputError
from ..core.tensors import check_images
from ..registry import hookimpl


class TimmBackbone(Backbone):
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

    @property
    def channels(self) -> list[int]:
        return list(self.body.feature_info.channels())

    @property
    def strides(self) -> list[int]:
        return list(self.body.feature_info.reduction())

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        check_images(images, channels=None)
        return list(self.body(images))


def _unused_stage(key: str, own: dict) -> bool:
    """True for keys of top-level modules the features_only model removed (e.g. layer4 when
    out_indices stops earlier), so they are not reported as unexpected."""
    top = key.split(".")[0]
    return not any(k.split(".")[0] == top for k in own)


@hookimpl
def register_components(register):
    register("timm-backbone", TimmBackbone)
