"""Core interfaces, configs, checkpoints and shared utilities of foveal."""

from .backbone import Backbone
from .checkpoint import load_state, read_state_dict, save_state
from .component import KINDS, Component, PlainComponent
from .config import ComponentConfig
from .decoder import Decoder
from .errors import CheckpointError, FovealError, InputError, PluginWarning, RegistryError
from .explainer import Explainer, OutputSelector, SegmentationTarget, select_output, target_scores
from .metric import Metric, PooledMetric
from .model import Model
from .modules import preserved_model_state, resolve_layer
from .pooling import Pooling
from .refiner import Refiner
from .tensors import check_images, check_maps, check_masks, normalize_maps, resize_maps

__all__ = [
    "KINDS", "Backbone", "CheckpointError", "Component", "PlainComponent", "ComponentConfig", "Decoder",
    "Explainer", "FovealError", "InputError", "Metric", "Model", "PooledMetric", "PluginWarning", "Pooling",
    "Refiner", "RegistryError", "SegmentationTarget", "check_images", "check_maps", "check_masks",
    "load_state", "normalize_maps", "OutputSelector", "preserved_model_state", "read_state_dict",
    "resize_maps", "resolve_layer", "save_state", "select_output", "target_scores",
]
