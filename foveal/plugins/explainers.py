"""Explainers: the CAM family, ViT relevance (Chefer et al.) and its attention baselines, and
CA-Stream's attention."""

from ..explainers.attention_baselines import AttentionGradCAM, AttentionRollout, PartialLRP, RawAttention
from ..explainers.attention_guided import AttentionGuidedCAM
from ..explainers.ca_attention import CaAttention
from ..explainers.gradient_cams import AbsCAMInit, GradCAM, GradCAMPlusPlus, LayerCAM, SmoothGradCAMpp, XGradCAM
from ..explainers.lrp import LRP
from ..explainers.score_cams import AbsCAM, ScoreCAM
from ..explainers.vit_lrp import TransformerAttribution
from ..registry import hookimpl


@hookimpl
def register_components(register):
    register("grad-cam", GradCAM, aliases=("gradcam",))
    register("grad-cam++", GradCAMPlusPlus, aliases=("gradcam++", "grad-cam-plus-plus"))
    register("xgrad-cam", XGradCAM, aliases=("xgradcam",))
    register("layer-cam", LayerCAM, aliases=("layercam",))
    register("smoothgrad-cam++", SmoothGradCAMpp, aliases=("smooth-grad-cam++", "smoothgradcampp"))
    register("score-cam", ScoreCAM, aliases=("scorecam",))
    register("abs-cam", AbsCAM, aliases=("abscam",))
    register("abs-cam-init", AbsCAMInit)
    register("attention-guided-cam", AttentionGuidedCAM, aliases=("ag-cam",))
    register("vit-lrp", TransformerAttribution, aliases=("transformer-attribution",))
    register("attention-rollout", AttentionRollout, aliases=("rollout",))
    register("raw-attention", RawAttention, aliases=("vit-raw-attention",))
    register("attn-grad-cam", AttentionGradCAM, aliases=("attention-grad-cam",))
    register("partial-lrp", PartialLRP)
    register("lrp", LRP)
    register("ca-attention", CaAttention, aliases=("ca-stream-attention",))
