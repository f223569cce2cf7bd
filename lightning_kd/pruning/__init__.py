"""HomoDistil and ETD: structural units, their importance, masks, physical shrinking, extraction and export.

- ``callback.py``: :class:`PruningCallback`, HomoDistil (Liang et al., ICLR 2023): the student starts as the teacher
  and loses heads, FFN neurons and hidden dimensions step by step while it distils.
- ``schedule.py``: :class:`PruningSchedule`, when HomoDistil's events fall and how many units each keeps;
  ``strategies.py``: :class:`ShrinkStrategy` and :class:`MaskStrategy`, what an event does to the student.
- ``extract.py``: :func:`extract`, ETD (Chen et al., ICANN 2021): a thin, shallow student taken from the teacher.
- ``units.py`` (what a unit is, masks), ``importance.py`` (PLATON, sensitivity, activations: the scorers),
  ``sensitivity.py`` (``|theta * grad|`` per unit, fast: it runs after every backward), ``prune.py`` and
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
)
from lightning_kd.pruning.prune import prune_model, pruned_parameter_count
from lightning_kd.pruning.schedule import PruningSchedule
from lightning_kd.pruning.sensitivity import unit_sensitivity
from lightning_kd.pruning.strategies import MaskStrategy, PruningStrategy, ShrinkStrategy
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
    "MaskStrategy",
    "Masks",
    "ParameterSlice",
    "PlatonImportance",
    "PruningCallback",
    "PruningSchedule",
    "PruningStrategy",
    "RandomImportance",
    "Sensitivity",
    "ShrinkStrategy",
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
