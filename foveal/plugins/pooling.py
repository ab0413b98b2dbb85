"""Pooling layers and the timm classifiers built on them (CA-Stream Table 1: GAP vs CA-Stream)."""

from ..models.ca_stream import CaStream, GlobalAveragePooling, TimmClassifier
from ..registry import hookimpl


@hookimpl
def register_components(register):
    register("gap", GlobalAveragePooling, aliases=("global-average-pooling",))
    register("ca-stream", CaStream, aliases=("cross-attention-stream",))
    register("gap-classifier", TimmClassifier, pooling="gap")
    register("ca-stream-classifier", TimmClassifier, aliases=("ca-classifier",), pooling="ca-stream")
