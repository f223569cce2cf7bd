"""TED, task-aware layer-wise distillation (Liang et al., ICML 2023), in one place.

- ``filters.py``: the task-aware filters (one per matched layer), their stage-I task heads (classifier for
  GLUE, start/end span scores for SQuAD) and their files;
- ``terms.py``: the objective's terms, the filters' task loss (stage I) and the filtered hidden-state match
  (stage II);
- ``callback.py``: :class:`TEDFilterCallback`, which adds the filters and the term to a run before the optimizer
  is built, and saves or loads them.
"""

from lightning_kd.ted.filters import (
    FilterHead,
    LayerFilters,
    SpanHead,
    filter_layer_pairs,
    load_filters,
    save_filters,
)
from lightning_kd.ted.terms import FilteredHidden, FilterTaskLoss

from lightning_kd.ted.callback import TEDFilterCallback  # isort: skip  (after the terms it registers)

__all__ = [
    "FilterHead",
    "FilterTaskLoss",
    "FilteredHidden",
    "LayerFilters",
    "SpanHead",
    "TEDFilterCallback",
    "filter_layer_pairs",
    "load_filters",
    "save_filters",
]
