"""Explainers: the CAM family, ViT relevance (Chefer et al.) and its attention baselines, and
CA-Stream's attention."""

from ..explainers.attention_baselines import AttentionGradCAM, AttentionRollout, PartialLRP, RawAttention
from ..explainers.attention_guided import AttentionGuidedCAM
from ..explainers.ca_attention import CaAttention
from ..explainers.decomposition_cams import KPCACAM, EigenCAM
from ..explainers.gradient_cams import (
    AbsCAMInit,
    FinerCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ShapleyCAM,
    SmoothGradCAMpp,
    XGradCAM,
)
from ..explainers.input_gradients import GradientXInput, IntegratedGradients, SmoothGrad
from ..explainers.lrp import LRP
from ..explainers.score_cams import AblationCAM, AbsCAM, ScoreCAM
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
    register("hirescam", HiResCAM, aliases=("hi-res-cam",))
    register("shapley-cam", ShapleyCAM, aliases=("shapleycam",))
    register("finer-cam", FinerCAM, aliases=("finercam",))
    register("ablation-cam", AblationCAM, aliases=("ablationcam",))
    register("eigen-cam", EigenCAM, aliases=("eigencam",))
    register("kpca-cam", KPCACAM, aliases=("kpcacam",))
    register("grad-x-input", GradientXInput, aliases=("gradient-times-input",))
    register("integrated-gradients", IntegratedGradients, aliases=("ig",))
    register("smoothgrad", SmoothGrad, aliases=("smooth-grad",))
    register("vit-lrp", TransformerAttribution, aliases=("transformer-attribution",))
    register("attention-rollout", AttentionRollout, aliases=("rollout",))
    register("raw-attention", RawAttention, aliases=("vit-raw-attention",))
    register("attn-grad-cam", AttentionGradCAM, aliases=("attention-grad-cam",))
    register("partial-lrp", PartialLRP)
    register("lrp", LRP)
    register("ca-attention", CaAttention, aliases=("ca-stream-attention",))
