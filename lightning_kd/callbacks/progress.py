"""The training progress bar of a ``lightning-kd`` run: it counts optimizer steps when the run is bounded by
``max_steps`` (a pre-training stream has no epochs to count), and epochs otherwise, as Lightning's bars do.

Lightning's bars describe the training bar as ``Epoch e/max_epochs - 1``; a run bounded only by ``max_steps`` has
``max_epochs = -1``, so Rich's bar read ``Epoch 0/-2`` and counted batches of an epoch that never ends. Here such
a run gets one bar for the whole run, ``Training steps ━━━━ 40/150``, that survives epoch boundaries and starts
at the resumed step. The logger's version (``v_num``) is left out of the bar: it is a folder name, not a metric.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from typing_extensions import override

STEPS_DESCRIPTION = "Training steps"


def counts_steps(trainer: L.Trainer) -> bool:
    """Whether the run ends at ``max_steps`` with no epoch bound (``max_epochs`` unset or -1)."""
    return trainer.max_steps > 0 and (trainer.max_epochs is None or trainer.max_epochs < 0)


def train_description(trainer: L.Trainer) -> str:
    """``Training steps`` for a step-bounded run, ``Epoch e`` for an unbounded one, ``Epoch e/last`` otherwise."""
    if counts_steps(trainer):
        return STEPS_DESCRIPTION
    if trainer.max_epochs is None or trainer.max_epochs < 0:
        return f"Epoch {trainer.current_epoch}"
    return f"Epoch {trainer.current_epoch}/{trainer.max_epochs - 1}"


def _without_version(metrics: dict[str, Any]) -> dict[str, Any]:
    metrics.pop("v_num", None)
    return metrics


class StepRichProgressBar(RichProgressBar):
    """Lightning's Rich bar, counting optimizer steps out of ``max_steps`` in a step-bounded run."""

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        description = train_description(self.trainer)
        # as Lightning pads it: the training and validation bars keep one width and do not flicker
        return f"{description:{len(self.validation_description)}}"

    @override
    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if counts_steps(self.trainer) else super().total_train_batches

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if counts_steps(trainer) and self.train_progress_bar_id is not None and not self._leave:
            return  # one bar for the whole run: a new epoch does not restart the step count
        super().on_train_epoch_start(trainer, pl_module)
        if counts_steps(trainer):
            self._update(self.train_progress_bar_id, trainer.global_step)

    @override
    def _update(self, progress_bar_id: Any, current: int, visible: bool = True) -> None:
        if (
            counts_steps(self.trainer)
            and progress_bar_id is not None
            and progress_bar_id == self.train_progress_bar_id
        ):
            current = self.trainer.global_step  # Lightning passes the batch index in the epoch
        super()._update(progress_bar_id, current, visible)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Leave the finished bar above what the callbacks print at the end of fit (the DistillationReport),
        # instead of redrawing it under them until teardown.
        self._stop_progress()

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return _without_version(super().get_metrics(trainer, pl_module))


class StepTQDMProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting optimizer steps out of ``max_steps`` in a step-bounded run."""

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        bar = self.train_progress_bar
        if counts_steps(trainer) and bar is not None and bar.total == trainer.max_steps and not self._leave:
            return  # one bar for the whole run: a new epoch does not restart the step count
        super().on_train_epoch_start(trainer, *args)
        if counts_steps(trainer):
            bar = self.train_progress_bar
            bar.total = trainer.max_steps
            bar.set_description(STEPS_DESCRIPTION, refresh=False)
            self._show(bar, trainer.global_step)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not counts_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        if bar is not None and self._should_update(trainer.global_step, bar.total):
            self._show(bar, trainer.global_step)
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    @staticmethod
    def _show(bar: Any, n: int) -> None:
        if not bar.disable:
            bar.n = n
            bar.refresh()

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return _without_version(super().get_metrics(trainer, pl_module))


def step_progress_bar() -> ProgressBar:
    """The bar Lightning would choose (Rich when it is installed, tqdm otherwise), counting steps when the run is
    bounded by steps."""
    return StepRichProgressBar() if _RICH_AVAILABLE else StepTQDMProgressBar()
