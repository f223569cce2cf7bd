"""Callbacks change the student or the objective, never the training loop itself."""

from .pruning import PruningCallback
from .report import DistillationReport

__all__ = ["DistillationReport", "PruningCallback"]
