"""The pruning schedule of HomoDistil: when events happen and how many units each keeps, without a Trainer.

:class:`PruningSchedule` is plain arithmetic over optimizer steps. :class:`~lightning_kd.pruning.callback.
PruningCallback` lays it out once it knows the student (``set_counts``: the full and target counts) and the run's
length (``resolve_end``), then asks it at every step whether an event is due and what that event keeps.
"""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Callable, Mapping

PRUNABLE = ("heads", "ffn", "hidden")


def cubic(progress: float) -> float:
    return 1.0 - (1.0 - progress) ** 3  # Zhu & Gupta (2017), HomoDistil's choice


def linear(progress: float) -> float:
    return progress


def one_shot(progress: float) -> float:
    return 1.0 if progress > 0 else 0.0  # prune once, at the first event


# functions, not lambdas: the schedule is pickled into every process under ddp_spawn
SCHEDULES: dict[str, Callable[[float], float]] = {"cubic": cubic, "linear": linear, "one-shot": one_shot}


def _check_shape(shape: Callable[[float], float]) -> None:
    """A schedule of one's own must go the whole way: ``shape(1.0) == 1``, or the last event stops short of the
    target (at 0, the student is never pruned)."""
    end = shape(1.0)
    if not isinstance(end, (int, float)) or not math.isclose(end, 1.0, abs_tol=1e-6):
        raise ValueError(
            f"the pruning schedule gives {end!r} at progress 1.0, but it must give 1.0 there (the whole way to "
            "the target at end_step), or the student never reaches its target: return the share of the way "
            "pruned, from 0.0 at the start to 1.0 at the end."
        )


class PruningSchedule:
    """Events every ``interval`` steps after ``start_step`` and at ``end_step``; the share of the way to the target
    pruned after progress p in [0, 1] is ``shape(p)``, so ``schedule(p)`` is that share.

    Args:
        start_step, end_step, interval: as for :class:`~lightning_kd.pruning.callback.PruningCallback`;
            ``end_step`` may stay ``None`` (the run's last step) or a float in (0, 1) (a share of it) until
            :meth:`resolve_end` knows the run's length.
        shape: ``cubic``, ``linear``, ``one-shot`` or a callable from progress to share.
        granularity: per kind, keep counts short of the target are rounded up to multiples of this.
    """

    def __init__(
        self,
        start_step: int = 0,
        end_step: int | float | None = None,
        interval: int = 10,
        shape: str | Callable[[float], float] = "cubic",
        granularity: Mapping[str, int] | None = None,
    ) -> None:
        if isinstance(shape, str) and shape not in SCHEDULES:
            raise ValueError(f"unknown schedule {shape!r}: use one of {', '.join(SCHEDULES)} or a callable.")
        if interval < 1 or start_step < 0:
            raise ValueError(f"interval must be >= 1 and start_step >= 0, got {interval} and {start_step}.")
        granularity = dict(granularity or {})
        bad = {k: v for k, v in granularity.items() if k not in PRUNABLE or not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(
                f"granularity {bad} is invalid: give whole numbers >= 1 for kinds among "
                f"{', '.join(PRUNABLE)}, e.g. granularity={{'hidden': 64, 'ffn': 64}}."
            )
        self.start_step, self.end_step, self.interval = start_step, end_step, interval
        self.shape = SCHEDULES[shape] if isinstance(shape, str) else shape
        if not isinstance(shape, str):
            _check_shape(shape)
        self.granularity = granularity
        self.full: dict[str, int] = {}  # per kind: the units the student has (per layer for heads and FFN)
        self.goal: dict[str, int] = {}  # per kind: the units the last event keeps

    def __call__(self, progress: float) -> float:
        return self.shape(progress)

    def __getstate__(self) -> dict:
        # ddp_spawn pickles every callback into each new process; pickle's "Can't pickle local object" names
        # neither the schedule nor a way out
        try:
            pickle.dumps(self.shape)
        except (pickle.PicklingError, AttributeError, TypeError) as error:
            raise pickle.PicklingError(
                f"the pruning schedule {getattr(self.shape, '__qualname__', self.shape)!r} cannot be pickled, and "
                "a strategy that starts its processes with spawn (ddp_spawn, or ddp in a notebook) pickles every "
                "callback: define it as a function at the top level of a module (not a lambda or a nested "
                "function), use schedule='cubic', 'linear' or 'one-shot', or strategy='ddp' from a script."
            ) from error
        return dict(self.__dict__)

    def __copy__(self) -> PruningSchedule:
        # copies need no pickling: a lambda schedule copies as it always did
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict) -> PruningSchedule:
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    # ------------------------------------------------------------------------------------------ laying out

    def set_counts(self, full: Mapping[str, int], target: Mapping[str, int | float]) -> None:
        """The student's ``full`` counts, and the goal ``target`` gives per kind (a fraction or a count)."""
        self.full = dict(full)
        self.goal = {kind: self._resolve(kind, value) for kind, value in target.items()}

    def _resolve(self, kind: str, value: float | int) -> int:
        full = self.full[kind]
        keep = round(value * full) if isinstance(value, float) else int(value)
        if not 1 <= keep <= full:
            raise ValueError(
                f"target {kind}={value!r} keeps {keep} of {full} {kind} units; the student can keep "
                f"between 1 and {full} (a float is a fraction, an int a count)."
            )
        return keep

    def resolve_end(self, last: int) -> int:
        """Fix ``end_step`` against the run's ``last`` step (``None``: that step; a float in (0, 1): a share)."""
        if self.end_step is None:
            self.end_step = last
        elif isinstance(self.end_step, float) and 0.0 < self.end_step < 1.0:
            self.end_step = max(self.start_step + 1, round(self.end_step * last))
        if self.end_step > last:
            raise ValueError(
                f"the pruning schedule ends at step {self.end_step}, after the run's last step "
                f"{last}: the student would never reach its target. Set end_step <= {last} or "
                "raise trainer.max_steps."
            )
        if self.end_step <= self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must come after start_step ({self.start_step}).")
        return self.end_step

    # ------------------------------------------------------------------------------------------ answers

    def is_due(self, step: int) -> bool:
        """Whether an event falls on ``step``: every ``interval`` steps after the start, and at the end."""
        if not self.start_step < step <= self.end_step:
            return False
        return (step - self.start_step) % self.interval == 0 or step == self.end_step

    def event_steps(self) -> list[int]:
        """Every step an event falls on, the last one at ``end_step``."""
        return [*range(self.start_step + self.interval, self.end_step, self.interval), self.end_step]

    def counts_passed(self, kind: str) -> list[int]:
        """Every count of ``kind`` the student has along the schedule, from the full one to the goal."""
        steps = self.event_steps()
        return sorted({self.full[kind], self.goal[kind], *(self.keep_counts(s)[kind] for s in steps)})

    def keep_counts(self, step: int) -> dict[str, int]:
        """How many units of each kind the schedule keeps after ``step`` (per layer for heads and FFN)."""
        span = max(self.end_step - self.start_step, 1)
        progress = min(max((step - self.start_step) / span, 0.0), 1.0)
        share = self.shape(progress)
        keep = {}
        for kind, goal in self.goal.items():
            count = round(self.full[kind] - (self.full[kind] - goal) * share)
            multiple = self.granularity.get(kind, 1)
            if count > goal and multiple > 1:  # never below the target, which the last event reaches exactly
                count = min(self.full[kind], math.ceil(count / multiple) * multiple)
            keep[kind] = max(goal, count)
        return keep
