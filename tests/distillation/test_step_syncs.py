"""A distillation step does not make the host wait for the device between logging steps, NonFiniteGuard included.

Counted by construction on the CPU (see sync_recorder.py): every operation that would wait for a GPU, from one
step's start to the next, with the step's whether-it-logs. Nothing is allowed: the guard decides on the device
(its flag goes to the fused optimizer, which skips a bad update itself) and reads its flags on logging steps.
On a CUDA machine the same runs go under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

import lightning as L
import pytest
import torch
from kd_helpers import BadLossAt, make_batch, quiet_trainer
from sync_recorder import SyncRecorder
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import BertForMaskedLM

from lightning_kd import DistillationModule, NonFiniteError, PruningCallback
from lightning_kd.callbacks.nonfinite import NonFiniteGuard
from lightning_kd.datamodules import with_prediction_positions
from lightning_kd.pruning import sensitivity
from lightning_kd.training.lightning_internals import logs_this_step

HOMOBERT = [{"term": "logits"}, {"term": "hidden", "loss": "mse", "layers": "uniform"}, {"term": "task"}]
STEPS, LOG_EVERY = 9, 3
# the steps (0-based, as trainer.global_step at their start) that do not log, after the first
QUIET = [k for k in range(1, STEPS) if (k + 1) % LOG_EVERY]


def module_and_data(
    teacher: BertForMaskedLM, module_cls: type, positions: bool = True, nan_at: int | None = None
) -> tuple[DistillationModule, list[dict[str, Tensor]]]:
    objective = [*HOMOBERT, *([BadLossAt(nan_at)] if nan_at is not None else [])]
    module = module_cls(teacher, {"init": "copy"}, objective=objective, task="masked-lm")
    # more batches than steps: the loader's epoch boundary (Lightning counts its length) stays out of the window
    batches = [make_batch(seed=i) for i in range(STEPS + 1)]
    if positions:
        batches = [with_prediction_positions(b) for b in batches]
    return module, batches


def pruning_callbacks(pruning: bool) -> list[L.Callback]:
    # pruning events on logging steps: an event decides on the host, which is allowed where a logger reads anyway
    return [PruningCallback({"hidden": 0.5, "heads": 0.5, "ffn": 0.5}, interval=LOG_EVERY)] if pruning else []


def run(
    teacher: BertForMaskedLM,
    *,
    positions: bool = True,
    pruning: bool = False,
    module_cls: type = DistillationModule,
    guard: NonFiniteGuard | None = None,
    nan_at: int | None = None,
) -> tuple[SyncRecorder, L.Trainer]:
    recorder = SyncRecorder()
    module, batches = module_and_data(teacher, module_cls, positions, nan_at)
    trainer = quiet_trainer(
        max_steps=STEPS,
        log_every_n_steps=LOG_EVERY,
        enable_progress_bar=True,
        callbacks=[*pruning_callbacks(pruning), *([guard] if guard else []), recorder],
    )
    # The CPU stands in for a GPU here, so the code takes its accelerator paths (the importance's embedding
    # shortcut finds its rows with a nonzero, which only a CPU run does).
    with recorder, mock.patch.object(sensitivity, "ROWS_ONLY_ON", ()):
        trainer.fit(module, DataLoader(batches, batch_size=None))
    return recorder, trainer


def describe(found: list[dict]) -> str:
    return "\n".join(
        f"step {f['step']}: {f['op']} from\n    " + "\n    ".join(f["where"][-6:]) for f in found
    )


@pytest.mark.parametrize("pruning", [False, True], ids=["distillation", "with-pruning"])
def test_no_sync_between_logging_steps(teacher: BertForMaskedLM, pruning: bool) -> None:
    recorder, trainer = run(teacher, pruning=pruning)
    # the module's own NonFiniteGuard is on, unpaused, and its optimizer takes the guard's flag
    assert sum(isinstance(c, NonFiniteGuard) for c in trainer.callbacks) == 1
    assert trainer.optimizers[0].defaults["fused"]
    # after the first step (which builds the optimizer state and registers the logged keys)
    found = recorder.between_logging_steps(after=1)
    assert not found, "operations that wait for a GPU between logging steps:\n" + describe(found)
    # the recorder does see what logging steps read back (timings, metrics): it is looking
    assert any(f["logging"] and f["step"] >= 1 for f in recorder.found)


def guard_reads(recorder: SyncRecorder) -> set[tuple[int, bool]]:
    """(step, logs) of the steps in which NonFiniteGuard read a value on the host."""
    return {
        (f["step"], f["logging"])
        for f in recorder.found
        if f["op"] == "aten._local_scalar_dense.default" and any("nonfinite.py" in w for w in f["where"])
    }


def test_the_guard_skips_a_bad_step_on_the_device_and_reports_it_at_the_next_logging_step(
    teacher: BertForMaskedLM,
) -> None:
    bad = QUIET[2]  # the NaN comes in a step that does not log (call `bad` is that step's)
    guard = NonFiniteGuard(policy="skip")
    recorder, trainer = run(teacher, guard=guard, nan_at=bad)
    found = recorder.between_logging_steps(after=1)
    assert not found, "the guard waited for the device between logging steps:\n" + describe(found)
    assert guard.skipped == [bad + 1]  # optimizer steps count from 1
    # it reads its flags on logging steps, and only there
    assert guard_reads(recorder) == {(k, True) for k in range(STEPS) if (k + 1) % LOG_EVERY == 0}
    assert trainer.global_step == STEPS


def test_stop_comes_at_the_next_logging_step(teacher: BertForMaskedLM) -> None:
    bad = QUIET[2]
    recorder = SyncRecorder()
    module, batches = module_and_data(teacher, DistillationModule, nan_at=bad)
    trainer = quiet_trainer(max_steps=STEPS, log_every_n_steps=LOG_EVERY, callbacks=[recorder])
    with (
        recorder,
        pytest.raises(NonFiniteError, match=f"optimizer step {bad + 1}: terms not finite: bad_loss_at"),
    ):
        trainer.fit(module, DataLoader(batches, batch_size=None))
    assert not recorder.between_logging_steps(after=1)
    next_log = next(k for k in range(bad, STEPS) if (k + 1) % LOG_EVERY == 0)
    assert trainer.global_step == next_log + 1


def test_a_batch_without_positions_costs_one_sync_and_an_item_in_the_step_is_caught(
    teacher: BertForMaskedLM,
) -> None:
    # without the collate's positions the module finds them itself: one nonzero per step, and it is seen
    found = run(teacher, positions=False)[0].between_logging_steps(after=1)
    assert {f["op"] for f in found} == {"aten.nonzero.default"}
    assert len(found) == len({f["step"] for f in found})  # once per step, for teacher and student together

    found = run(teacher, module_cls=Chatty)[0].between_logging_steps(after=1)
    assert found and {f["op"] for f in found} == {"aten._local_scalar_dense.default"}


class Chatty(DistillationModule):
    """Prints its loss every step: a sync in every step, the control the sync checks must catch."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        print(f"loss {loss.item():.3f}")
        return loss


# ------------------------------------------------------------------------------------------ on a GPU

NO_CUDA = (
    "SKIPPED LOUDLY: no CUDA device here, so the run under torch.cuda.set_sync_debug_mode('error') cannot run; "
    "the CPU recorder tests above cover the same steps. Run this file on a GPU machine."
)


class SyncErrors(L.Callback):
    """Turns CUDA's sync debug mode to ``error`` from the start of every step that does not log (after the first)
    to the start of the next, and counts the steps that ran in it to their end."""

    def __init__(self) -> None:
        self.quiet = False
        self.quiet_steps: list[int] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.quiet = trainer.global_step >= 1 and not logs_this_step(trainer)
        torch.cuda.set_sync_debug_mode("error" if self.quiet else "default")

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.quiet and torch.cuda.get_sync_debug_mode() == 2:  # 2: error
            self.quiet_steps.append(trainer.global_step - 1)

    def on_train_end(self, *args: Any) -> None:
        torch.cuda.set_sync_debug_mode("default")


def cuda_fit(
    teacher: BertForMaskedLM, module_cls: type, pruning: bool, nan_at: int | None = None
) -> tuple[SyncErrors, L.Trainer]:
    module, batches = module_and_data(teacher, module_cls, nan_at=nan_at)
    errors = SyncErrors()
    guard = [NonFiniteGuard(policy="skip")] if nan_at is not None else []
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=STEPS,
        log_every_n_steps=LOG_EVERY,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[errors, *guard, *pruning_callbacks(pruning)],
    )
    try:
        trainer.fit(module, DataLoader(batches, batch_size=None, pin_memory=True))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return errors, trainer


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize(
    "pruning,nan_at",
    [(False, None), (True, None), (False, QUIET[2])],
    ids=["distillation", "with-pruning", "nan"],
)
def test_no_sync_between_logging_steps_on_cuda(
    teacher: BertForMaskedLM, pruning: bool, nan_at: int | None
) -> None:
    errors, trainer = cuda_fit(teacher, DistillationModule, pruning, nan_at)
    assert trainer.global_step == STEPS
    guards = [c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)]
    assert len(guards) == 1 and trainer.optimizers[0].defaults["fused"]  # its flag goes to the optimizer
    # every step that does not log ran, to its end, with any sync an error
    assert errors.quiet_steps == QUIET
    if nan_at is not None:  # the guard skipped the NaN step on the device, and said so at a logging step
        assert guards[0].skipped == [nan_at + 1]
        assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_sync_errors_are_on_an_item_in_the_step_raises(teacher: BertForMaskedLM) -> None:
    # the control: the same run with a .item() in the step must fail in its first quiet step
    with pytest.raises(RuntimeError, match="synchronizing CUDA operation"):
        cuda_fit(teacher, Chatty, pruning=False)
    assert torch.cuda.get_sync_debug_mode() == 0
