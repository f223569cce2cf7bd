"""Step accounting: the LightningModule hooks that split every training step's time among its phases (see
:class:`lightning_kd.training.timing.StepTimer`) and report it, with the loss, on the steps that log."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from torch import Tensor
from typing_extensions import override

from lightning_kd.training.lightning_internals import accumulating, logs_this_step
from lightning_kd.training.timing import StepTimer


class StepAccounting(L.LightningModule):
    """Times the backward pass, the optimizer step and whole steps with ``self.step_timer`` (``None``: not
    timed), pauses the clock while validating, and logs the timings and the throughput summed over ranks. The
    module's own hooks for these events call ``super()`` first."""

    step_timer: StepTimer | None

    @override
    def on_before_backward(self, loss: Tensor) -> None:
        if self.step_timer:
            self.step_timer.start("student_backward")

    @override
    def on_after_backward(self) -> None:
        if self.step_timer:
            self.step_timer.stop("student_backward")

    @override
    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        timer = self.step_timer
        if timer is None or optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

        # The closure is the forward and backward pass; what follows it inside `step` (gradient clipping, the
        # callbacks' on_before_optimizer_step, the update itself) is the optimizer's share.
        def closure() -> Any:
            result = optimizer_closure()
            timer.start("optimizer")
            return result

        try:
            optimizer.step(closure=closure)
        finally:
            timer.stop("optimizer")

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if logs_this_step(self.trainer) and isinstance(outputs, Mapping):
            # Lightning turns every progress-bar value into a Python number at every step (a wait for the GPU),
            # so the loss is not logged with prog_bar=True: the bar shows it as of the last logging step.
            self.trainer.progress_bar_metrics["loss"] = float(outputs["loss"])
        timer = self.step_timer
        if timer is None:
            return
        if accumulating(self.trainer):
            return  # a micro-batch: the optimizer step it belongs to has not finished
        timer.end_step()
        if logs_this_step(self.trainer):
            values = timer.summary()
            throughput = {k: v for k, v in values.items() if k.startswith("throughput/")}
            self.log_dict({k: v for k, v in values.items() if k not in throughput}, batch_size=1)
            # every rank processes its own share: the run's throughput is their sum
            self.log_dict(throughput, batch_size=1, sync_dist=True, reduce_fx="sum")

    @override
    def on_train_start(self) -> None:
        if self.step_timer:
            self.step_timer.to(self.device).reset()

    @override
    def on_validation_start(self) -> None:
        if self.step_timer:
            self.step_timer.pause()

    @override
    def on_validation_end(self) -> None:
        if self.step_timer:
            self.step_timer.resume()
