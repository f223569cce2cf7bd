"""HomoDistil and ETD: structural units, their importance, masks, physical shrinking, extraction and export.

- ``callback.py``: :class:`PruningCallback`, HomoDistil (Liang et al., ICLR 2023): the student starts as the teacher
  and loses heads, FFN neurons and hidden dimensions step by step while it distils.
- ``extract.py``: :func:`extract`, ETD (Chen et al., ICANN 2021): a thin, shallow student taken from the teacher.
- ``units.py`` (what a unit is, masks), ``importance.py`` (PLATON, sensitivity, activations), ``prune.py`` and
  ``shrink.py`` (removing units physically, with optimizer state), ``export.py`` (plain transformers folders).
"""

from lightning_kd.pruning.callback import PruningCallback
from lightning_kd.pruning.export import export_pretrained, load_pruned, save_standard, to_standard
from lightning_kd.pruning.extract import extract
from lightning_kd.pruning.importance import (
    ActivationImportance,
    PlatonImportance,
    RandomImportance,
    Sensitivity,
    UnitImportance,
    score_units,
    top_units,
    unit_sensitivity,
)
from lightning_kd.pruning.prune import prune_model, pruned_parameter_count
from lightning_kd.pruning.units import (
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
    "MaskHandle",
    "Masks",
    "ParameterSlice",
    "PlatonImportance",
    "PruningCallback",
    "RandomImportance",
    "Sensitivity",
    "UnitImportance",
    "apply_masks",
    "export_pretrained",
    "extract",
    "full_masks",
    "load_pruned",
    "masked",
    "masked_parameter_slices",
    "prune_model",
    "pruned_parameter_count",
    "save_standard",
    "score_units",
    "to_standard",
    "top_units",
    "unit_counts",
    "unit_sensitivity",
    "validate_masks",
    "zero_masked_",
]
