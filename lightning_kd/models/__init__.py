"""The one place that knows a transformer's insides: adapters per architecture and what is built on them."""

from . import bert, deberta_v2, roberta  # noqa: F401  (registers the adapters)
from .base import ArchitectureAdapter, HiddenParts, LayerParts, MaskedLMParts
from .capture import capture_qkv
from .export import (
    check_export_dir,
    check_export_written,
    check_exportable,
    export_pretrained,
    load_pruned,
    nonfinite_parameters,
    parameter_count,
    save_standard,
    to_standard,
)
from .extract import extract
from .importance import (
    ActivationImportance,
    PlatonImportance,
    RandomImportance,
    Sensitivity,
    UnitImportance,
    score_units,
    top_units,
    unit_sensitivity,
)
from .layers import (
    freeze_unused_pooler,
    is_classifier,
    keep_layers_,
    max_sequence_length,
    select_layers,
    uniform_layer_choice,
)
from .prune import prune_model, pruned_parameter_count
from .registry import get_adapter, register_adapter, supported_model_types
from .units import (
    UNIT_KINDS,
    MaskHandle,
    Masks,
    ParameterSlice,
    apply_masks,
    full_masks,
    masked,
    masked_parameter_slices,
    unit_counts,
    validate_masks,
    zero_masked_,
)

__all__ = [
    "UNIT_KINDS",
    "ActivationImportance",
    "ArchitectureAdapter",
    "HiddenParts",
    "LayerParts",
    "MaskedLMParts",
    "MaskHandle",
    "Masks",
    "ParameterSlice",
    "PlatonImportance",
    "RandomImportance",
    "Sensitivity",
    "UnitImportance",
    "apply_masks",
    "capture_qkv",
    "freeze_unused_pooler",
    "check_export_dir",
    "check_export_written",
    "check_exportable",
    "export_pretrained",
    "nonfinite_parameters",
    "parameter_count",
    "save_standard",
    "extract",
    "full_masks",
    "get_adapter",
    "is_classifier",
    "keep_layers_",
    "max_sequence_length",
    "load_pruned",
    "masked",
    "masked_parameter_slices",
    "prune_model",
    "pruned_parameter_count",
    "register_adapter",
    "score_units",
    "select_layers",
    "supported_model_types",
    "to_standard",
    "top_units",
    "uniform_layer_choice",
    "unit_counts",
    "unit_sensitivity",
    "validate_masks",
    "zero_masked_",
]
