"""The one place that knows a transformer's insides: one adapter per architecture family, and nothing else.

An adapter answers, by role, where a family keeps its parts (layers, attention's query/key/value and output,
the FFN, norms, embeddings, the prediction head), so that pruning, extraction, the objective's hooks and export
never name a model's attributes. Pruning surgery built on these answers lives in ``lightning_kd.pruning``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from lightning_kd.models import bert, deberta_v2, llama, modernbert, roberta  # noqa: F401  (registers the adapters)
from lightning_kd.models.adapter import ArchitectureAdapter, HiddenParts, LayerParts, MaskedLMParts
from lightning_kd.models.bound import BoundModel, bind
from lightning_kd.models.capture import capture_qkv
from lightning_kd.models.info import has_adapter, masked_lm_parts, model_info
from lightning_kd.models.layers import (
    freeze_unused_pooler,
    is_classifier,
    keep_layers_,
    max_sequence_length,
    select_layers,
    uniform_layer_choice,
)
from lightning_kd.models.registry import get_adapter, register_adapter, supported_model_types

__all__ = [
    "ArchitectureAdapter",
    "BoundModel",
    "HiddenParts",
    "LayerParts",
    "MaskedLMParts",
    "bind",
    "capture_qkv",
    "freeze_unused_pooler",
    "get_adapter",
    "has_adapter",
    "is_classifier",
    "keep_layers_",
    "masked_lm_parts",
    "max_sequence_length",
    "model_info",
    "register_adapter",
    "select_layers",
    "supported_model_types",
    "uniform_layer_choice",
]

# Pruning surgery that lived here before 0.2 and is now in lightning_kd.pruning: still importable from here.
_MOVED = {
    **dict.fromkeys(
        (
            "check_export_dir",
            "check_export_written",
            "check_exportable",
            "export_pretrained",
            "load_pruned",
            "nonfinite_parameters",
            "parameter_count",
            "save_standard",
            "to_standard",
        ),
        "lightning_kd.pruning.export",
    ),
    "extract": "lightning_kd.pruning.extract",
    **dict.fromkeys(
        (
            "ActivationImportance",
            "PlatonImportance",
            "RandomImportance",
            "Sensitivity",
            "UnitImportance",
            "score_units",
            "top_units",
            "unit_sensitivity",
        ),
        "lightning_kd.pruning.importance",
    ),
    **dict.fromkeys(("prune_model", "pruned_parameter_count"), "lightning_kd.pruning.prune"),
    **dict.fromkeys(
        (
            "UNIT_KINDS",
            "MaskHandle",
            "Masks",
            "ParameterSlice",
            "apply_masks",
            "full_masks",
            "masked",
            "masked_parameter_slices",
            "unit_counts",
            "validate_masks",
            "zero_masked_",
        ),
        "lightning_kd.pruning.units",
    ),
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"lightning_kd.models.{name} moved to {_MOVED[name]}.{name}.", FutureWarning, stacklevel=2
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'lightning_kd.models' has no attribute {name!r}")
