"""The one place that knows a transformer's insides: adapters per architecture and what is built on them."""

from . import bert, deberta_v2, roberta  # noqa: F401  (registers the adapters)
from .base import ArchitectureAdapter, LayerParts
from .capture import capture_qkv
from .layers import select_layers, uniform_layer_choice
from .registry import get_adapter, register_adapter, supported_model_types

__all__ = [
    "ArchitectureAdapter",
    "LayerParts",
    "capture_qkv",
    "get_adapter",
    "register_adapter",
    "select_layers",
    "supported_model_types",
    "uniform_layer_choice",
]
