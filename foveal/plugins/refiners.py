"""Refiners: AffinityNet (Ahn & Kwak, CVPR 2018; vit-lrp-affinitynet.txt sec. 4.3)."""

from ..models.affinitynet import AffinityNet
from ..registry import hookimpl


@hookimpl
def register_components(register):
    register("affinitynet", AffinityNet, aliases=("affinity-net", "psa"))
