"""A distillation step does not make the host wait for the device between logging steps.

Counted by construction on the CPU (see sync_recorder.py): every operation that would wait for a GPU, from one
step's start to the next, with the step's whether-it-logs. The one sync allowed on purpose is NonFiniteGuard's
check before each update (one flag per optimizer step, so a bad step is never applied); it is paused here.
On a CUDA machine the same run goes under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from kd_helpers import make_batch, quiet_trainer
from sync_recorder import Paused, SyncRecorder
from torch.utils.data import DataLoader
from transformers import BertForMaskedLM

from lightning_kd import DistillationModule, PruningCallback
from lightning_kd.callbacks.nonfinite import NonFiniteGuard
from lightning_kd.datamodules import with_prediction_positions

HOMOBERT = [{"term": "logits"}, {"term": "hidden", "loss": "mse", "layers": "uniform"}, {"term": "task"}]
STEPS, LOG_EVERY = 9, 3


def run(
    teacher: BertForMaskedLM,
    monkeypatch: pytest.MonkeyPatch,
    *,
    positions: bool = True,
    pruning: bool = False,
    module_cls: type = DistillationModule,
) -> SyncRecorder:
    recorder = SyncRecorder()
    guard_step = NonFiniteGuard.on_before_optimizer_step

    def paused_guard(self: NonFiniteGuard, *args: Any) -> None:
        with Paused(recorder):
            guard_step(self, *args)

    monkeypatch.setattr(NonFiniteGuard, "on_before_optimizer_step", paused_guard)
    module = module_cls(teacher, {"init": "copy"}, objective=HOMOBERT, task="masked-lm")
    # more batches than steps: the loader's epoch boundary (Lightning counts its length) stays out of the window
    batches = [make_batch(seed=i) for i in range(STEPS + 1)]
    if positions:
        batches = [with_prediction_positions(b) for b in batches]
    # pruning events on logging steps: an event decides on the host, which is allowed where a logger reads anyway
    callbacks = (
        [PruningCallback({"hidden": 0.5, "heads": 0.5, "ffn": 0.5}, interval=LOG_EVERY)] if pruning else []
    )
    trainer = quiet_trainer(
        max_steps=STEPS,
        log_every_n_steps=LOG_EVERY,
        enable_progress_bar=True,
        callbacks=[*callbacks, recorder],
    )
    with recorder:
        trainer.fit(module, DataLoader(batches, batch_size=None))
    return recorder


def describe(found: list[dict]) -> str:
    return "\n".join(
        f"step {f['step']}: {f['op']} from\n    " + "\n    ".join(f["where"][-6:]) for f in found
    )


@pytest.mark.parametrize("pruning", [False, True], ids=["distillation", "with-pruning"])
def test_no_sync_between_logging_steps(
    teacher: BertForMaskedLM, monkeypatch: pytest.MonkeyPatch, pruning: bool
) -> None:
    recorder = run(teacher, monkeypatch, pruning=pruning)
    # after the first step (which builds the optimizer state and registers the logged keys)
    found = recorder.between_logging_steps(after=1)
    assert not found, "operations that wait for a GPU between logging steps:\n" + describe(found)
    # the recorder does see what logging steps read back (timings, metrics): it is looking
    assert any(f["logging"] and f["step"] >= 1 for f in recorder.found)


def test_a_batch_without_positions_costs_one_sync_and_an_item_in_the_step_is_caught(
    teacher: BertForMaskedLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    # without the collate's positions the module finds them itself: one nonzero per step, and it is seen
    found = run(teacher, monkeypatch, positions=False).between_logging_steps(after=1)
    assert {f["op"] for f in found} == {"aten.nonzero.default"}
    assert len(found) == len({f["step"] for f in found})  # once per step, for teacher and student together

    class Chatty(DistillationModule):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            print(f"loss {loss.item():.3f}")
            return loss

    found = run(teacher, monkeypatch, module_cls=Chatty).between_logging_steps(after=1)
    assert found and {f["op"] for f in found} == {"aten._local_scalar_dense.default"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_sync_between_logging_steps_on_cuda(
    teacher: BertForMaskedLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    mode = {"quiet": False}
    guard_step = NonFiniteGuard.on_before_optimizer_step

    def allowed_guard(self: NonFiniteGuard, *args: Any) -> None:
        torch.cuda.set_sync_debug_mode("default")
        try:
            guard_step(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode("error" if mode["quiet"] else "default")

    class SyncDebug(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            mode["quiet"] = trainer.global_step >= 1 and not trainer._logger_connector.should_update_logs
            torch.cuda.set_sync_debug_mode("error" if mode["quiet"] else "default")

        def on_train_end(self, *args: Any) -> None:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(NonFiniteGuard, "on_before_optimizer_step", allowed_guard)
    module = DistillationModule(teacher, {"init": "copy"}, objective=HOMOBERT, task="masked-lm")
    batches = [with_prediction_positions(make_batch(seed=i)) for i in range(STEPS + 1)]
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=STEPS,
        log_every_n_steps=LOG_EVERY,
        logger=False,
        enable_checkpointing=False,
        callbacks=[SyncDebug()],
    )
    try:
        trainer.fit(module, DataLoader(batches, batch_size=None, pin_memory=True))
    finally:
        torch.cuda.set_sync_debug_mode("default")
