"""What callbacks may ask of a lightning-kd module: the contract between the papers' callbacks and the modules.

``PruningCallback``, ``TEDFilterCallback``, ``DistillationReport``, ``RunDashboard`` and ``NonFiniteGuard``
read a module through these names and no others (``tests/distillation/test_contract.py`` checks both sides).
:class:`~lightning_kd.distillation.DistillationModule` provides all of them; a module of your own that provides
the ones a callback needs works with that callback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

# What each callback needs; checked when fit starts, so a wrong module fails before any step.
NEEDS: dict[str, tuple[str, ...]] = {
    "PruningCallback": ("student", "teacher", "objective"),
    "TEDFilterCallback": ("student", "teacher", "objective"),
    "DistillationReport": ("student", "teacher", "discrepancy", "save_student"),
}


@runtime_checkable
class DistillationRun(Protocol):
    """A LightningModule that distils ``teacher`` into ``student`` with ``objective``."""

    student: nn.Module
    teacher: nn.Module
    objective: nn.Module  # a DistillationObjective
    step_timer: Any  # a StepTimer, or None when time_steps is off
    last_terms: Mapping[str, Tensor]  # the last training step's terms, for NonFiniteGuard's message

    def save_student(
        self, path: Any, tokenizer: Any = None, probe: Any = None, discrepancy: Any = None
    ) -> str: ...

    def discrepancy(self, batches: Sequence[Mapping[str, Tensor]]) -> dict[str, float]: ...

    def evaluation_summary(self) -> list[str]: ...


def require_run(module: Any, who: str) -> None:
    """Refuse, naming what is missing, a module that lacks what callback ``who`` reads."""
    missing = [name for name in NEEDS[who] if not hasattr(module, name)]
    if missing:
        raise TypeError(
            f"{who} works on a distillation module, but {type(module).__name__} has no {', '.join(missing)}. Use "
            "lightning_kd.DistillationModule (a FineTuningModule trains one model and has no teacher), or give "
            f"your module what lightning_kd.distillation.contract.DistillationRun lists."
        )
