"""The callbacks that watch, guard and report a run: non-finite steps, preemption, the end-of-fit report, the W&B
dashboard and the GLUE submission writer.

Callbacks never replace the training loop: they change the student or the objective between steps, or stop or
skip a step (NonFiniteGuard, PreemptionCheckpoint) through Lightning's own switches. The papers' callbacks live
with their method: :class:`~lightning_kd.pruning.PruningCallback` (HomoDistil) in ``lightning_kd.pruning``,
:class:`~lightning_kd.ted.TEDFilterCallback` in ``lightning_kd.ted``; both are importable from here too.
"""

from lightning_kd.callbacks.dashboard import RunDashboard
from lightning_kd.callbacks.nonfinite import NonFiniteError, NonFiniteGuard
from lightning_kd.callbacks.preemption import PreemptionCheckpoint
from lightning_kd.callbacks.report import DistillationReport
from lightning_kd.callbacks.submission import GLUESubmissionWriter

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


def __getattr__(name: str) -> object:
    # the papers' callbacks, importable from here as before 0.2 (lazily: they import this package's helpers)
    if name == "PruningCallback":
        from lightning_kd.pruning.callback import PruningCallback

        return PruningCallback
    if name == "TEDFilterCallback":
        from lightning_kd.ted.callback import TEDFilterCallback

        return TEDFilterCallback
    raise AttributeError(f"module 'lightning_kd.callbacks' has no attribute {name!r}")
