"""Where a distillation step's time goes, measured on every step and cheap enough to leave on.

A step cannot cost less than the teacher's forward pass, the student's forward and backward passes and the
optimizer; :class:`StepTimer` splits every step into those parts plus pruning and TED filters, and whatever
is left (data loading, logging, other hooks) is ``other``. Sections nest: a section opened inside another is
subtracted from it, so the parts add up to the step.

On a GPU the clock is a pair of CUDA events per section, so timing never waits for the device; the events are
read once per logging interval, after one synchronisation, and every figure is the mean over the steps of the
interval. On a CPU the clock is ``time.perf_counter``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

SECTIONS = ("teacher_forward", "student_forward", "student_backward", "optimizer", "pruning", "filters")
METRICS = (
    *(f"time/{name}_ms" for name in (*SECTIONS, "step", "other")),
    "throughput/tokens_per_s",
    "throughput/samples_per_s",
)  # what `StepTimer.summary` can return


class _HostClock:
    """Marks on the host clock, in seconds."""

    def mark(self) -> float:
        return time.perf_counter()

    @staticmethod
    def elapsed_ms(start: float, end: float) -> float:
        return (end - start) * 1000.0

    def settle(self) -> None:
        return None


class _CudaClock:
    """Marks in the CUDA stream: recording an event does not wait for the device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._last: Any = None

    def mark(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        self._last = event
        return event

    @staticmethod
    def elapsed_ms(start: Any, end: Any) -> float:
        return float(start.elapsed_time(end))

    def settle(self) -> None:
        if self._last is not None:
            self._last.synchronize()


class StepTimer:
    """Per-step time of named sections, plus tokens and samples, summarised once per logging interval.

    ``section(name)`` times a block; ``start(name)`` / ``stop(name)`` time a span that opens and closes in
    different hooks. ``end_step`` closes a training step (an optimizer step, so micro-batches of gradient
    accumulation add up into it); ``summary`` returns the interval's means and starts a new interval.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.to(device)
        self._open: dict[str, tuple[Any, str | None]] = {}
        self._stack: list[str] = []
        self._spans: list[tuple[str, str | None, Any, Any]] = []
        self._tokens: torch.Tensor | int = 0
        self._samples = 0
        self._steps = 0
        self._interval_start = time.perf_counter()
        self._paused_at: float | None = None

    def to(self, device: torch.device | str) -> StepTimer:
        device = torch.device(device)
        self.clock: _HostClock | _CudaClock = _CudaClock(device) if device.type == "cuda" else _HostClock()
        return self

    def start(self, name: str) -> None:
        if name in self._open:
            return  # re-entered (a retried closure): the first start stands
        parent = self._stack[-1] if self._stack else None
        self._open[name] = (self.clock.mark(), parent)
        self._stack.append(name)

    def stop(self, name: str) -> None:
        opened = self._open.pop(name, None)
        if opened is None:
            return
        begin, parent = opened
        self._spans.append((name, parent, begin, self.clock.mark()))
        if name in self._stack:
            self._stack.remove(name)

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def count(self, batch: Any) -> None:
        """Count a batch's real (non-padding) tokens and its samples, without reading anything off the device."""
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        self._tokens = self._tokens + (mask.sum() if mask is not None else ids.numel())
        self._samples += ids.shape[0]

    def end_step(self) -> None:
        self._steps += 1

    def reset(self) -> None:
        """Forget the interval so far (set-up time, a sanity check) and start a new one now."""
        self._open, self._stack, self._spans = {}, [], []
        self._tokens, self._samples, self._steps = 0, 0, 0
        self._interval_start, self._paused_at = time.perf_counter(), None

    def pause(self) -> None:
        """Stop the interval's wall clock (validation inside a training interval is not training time)."""
        if self._paused_at is None:
            self._paused_at = time.perf_counter()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._interval_start += time.perf_counter() - self._paused_at
            self._paused_at = None

    def summary(self) -> dict[str, float]:
        """Means per step since the last summary: ``time/<section>_ms``, ``time/step_ms``, ``time/other_ms``,
        ``throughput/tokens_per_s`` and ``throughput/samples_per_s`` (this process's share)."""
        self.clock.settle()
        now = time.perf_counter()
        steps = max(self._steps, 1)
        totals: dict[str, float] = {}
        for name, parent, begin, end in self._spans:
            elapsed = self.clock.elapsed_ms(begin, end)
            totals[name] = totals.get(name, 0.0) + elapsed
            if parent is not None:
                totals[parent] = totals.get(parent, 0.0) - elapsed
        wall_s = max(now - self._interval_start, 1e-9)
        out = {f"time/{name}_ms": total / steps for name, total in totals.items()}
        out["time/step_ms"] = wall_s * 1000.0 / steps
        out["time/other_ms"] = max(out["time/step_ms"] - sum(totals.values()) / steps, 0.0)
        out["throughput/tokens_per_s"] = float(self._tokens) / wall_s
        out["throughput/samples_per_s"] = self._samples / wall_s
        self._spans, self._tokens, self._samples, self._steps = [], 0, 0, 0
        self._interval_start = now
        return out


def timed(owner: Any, name: str) -> Any:
    """``owner.step_timer.section(name)`` when ``owner`` (a module) keeps a timer, else a no-op context."""
    timer = getattr(owner, "step_timer", None)
    return timer.section(name) if timer is not None else nullcontext()
