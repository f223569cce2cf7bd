"""Callbacks change the student or the objective, never the training loop itself."""

from .dashboard import RunDashboard
from .nonfinite import NonFiniteError, NonFiniteGuard
from .preemption import PreemptionCheckpoint
from .pruning import PruningCallback
from .report import DistillationReport
from .submission import GLUESubmissionWriter
from .ted import TEDFilterCallback

__all__ = [
    "DistillationReport",
    "GLUESubmissionWriter",
    "NonFiniteError",
    "NonFiniteGuard",
    "PreemptionCheckpoint",
    "PruningCallback",
    "RunDashboard",
    "TEDFilterCallback",
]
