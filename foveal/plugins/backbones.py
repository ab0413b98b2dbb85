"""Backbones: PVTv2 B0-B5 and any timm feature extractor."""

from ..models.backbones import PVT_VARIANTS, PVTv2Backbone, TimmBackbone
from ..registry import hookimpl


@hookimpl
def register_components(register):
    register("timm-backbone", TimmBackbone)
    for variant in PVT_VARIANTS:
        register(f"pvt-v2-{variant}", PVTv2Backbone, variant=variant)
