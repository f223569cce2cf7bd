"""PreemptionCheckpoint: a warning signal mid-step leads to one checkpoint at an agreed step, and the run resumed
from it ends like one that never stopped. (Under a real SLURM cluster with DDP: tests/slurm.)"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from kd_helpers import FixedBatches, ResumableBatches, quiet_trainer, tiny_bert_config
from transformers import BertForMaskedLM

from lightning_kd import DistillationModule, PreemptionCheckpoint, PruningCallback
from lightning_kd.callbacks.preemption import next_hpc_path, requeue_slurm_job
from lightning_kd.cli.app import add_preemption_checkpoint_under_slurm


class SignalAt(L.Callback):
    """Sends the process SIGUSR1 in the middle of step ``step``, between its forward and backward passes."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def _run(
    teacher: BertForMaskedLM,
    root: Path,
    extra: list[L.Callback],
    ckpt_path: str | None = None,
) -> DistillationModule:
    L.seed_everything(0)
    module = DistillationModule(
        teacher, {"init": "copy"}, objective=[{"term": "hidden"}, {"term": "logits"}], learning_rate=1e-3
    )
    pruning = PruningCallback({"heads": 0.5, "ffn": 0.5}, interval=2, end_step=8)
    trainer = quiet_trainer(max_steps=10, default_root_dir=root, callbacks=[pruning, *extra])
    # four batches an epoch: the checkpoint of step 6 is two batches into the second epoch
    trainer.fit(module, ResumableBatches(num_batches=4), ckpt_path=ckpt_path)
    return module


def test_signal_mid_step_checkpoints_at_the_next_check_and_resumes_to_the_same_student(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    torch.manual_seed(0)
    teacher = BertForMaskedLM(tiny_bert_config(hidden_dropout_prob=0.1)).eval()
    straight = _run(teacher, tmp_path / "straight", [])

    preemption = PreemptionCheckpoint(check_every=2)
    handler_before = signal.getsignal(signal.SIGUSR1)
    with pytest.warns(UserWarning, match="not a SLURM job"):
        stopped = _run(teacher, tmp_path / "run", [SignalAt(step=4), preemption])
    # the signal came during step 5 (global_step 4 before its update); the next check is after step 6
    assert preemption.saved == str(tmp_path / "run" / "hpc_ckpt_1.ckpt")
    assert torch.load(preemption.saved, weights_only=False)["global_step"] == 6
    assert stopped.trainer.global_step == 6  # it stopped there, still masked (the schedule ends at 8)
    assert signal.getsignal(signal.SIGUSR1) == handler_before  # the handler is put back

    resumed = _run(teacher, tmp_path / "run", [], ckpt_path=preemption.saved)
    assert straight.student.state_dict().keys() == resumed.student.state_dict().keys()
    for (name, a), b in zip(
        straight.student.state_dict().items(), resumed.student.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_it_refuses_to_come_before_a_pruning_callback(teacher: BertForMaskedLM, tmp_path: Path) -> None:
    module = DistillationModule(teacher, {"init": "copy"})
    trainer = quiet_trainer(
        max_steps=2,
        default_root_dir=tmp_path,
        callbacks=[PreemptionCheckpoint(), PruningCallback({"ffn": 0.5}, interval=1)],
    )
    with pytest.raises(ValueError, match="after the PruningCallback"):
        trainer.fit(module, FixedBatches())


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="unknown signal 'USR1'"):
        PreemptionCheckpoint(signal_name="USR1")
    with pytest.raises(ValueError, match="check_every"):
        PreemptionCheckpoint(check_every=0)


def test_hpc_checkpoints_are_numbered_past_the_last(tmp_path: Path) -> None:
    assert next_hpc_path(tmp_path) == str(tmp_path / "hpc_ckpt_1.ckpt")
    (tmp_path / "hpc_ckpt_1.ckpt").touch()
    (tmp_path / "hpc_ckpt_7.ckpt").touch()
    (tmp_path / ".hpc_ckpt_9.ckpt.123.partial").touch()  # a killed write is not a checkpoint
    assert next_hpc_path(tmp_path) == str(tmp_path / "hpc_ckpt_8.ckpt")


def test_requeue_outside_slurm_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.warns(UserWarning, match="not a SLURM job"):
        assert requeue_slurm_job() is False


def test_the_cli_adds_it_under_slurm_after_the_other_callbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    pruning = PruningCallback({"ffn": 0.5})
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[pruning, ModelCheckpoint()])
    add_preemption_checkpoint_under_slurm(trainer)
    assert not any(isinstance(c, PreemptionCheckpoint) for c in trainer.callbacks)  # not under SLURM
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "distil")
    add_preemption_checkpoint_under_slurm(trainer)
    kinds = [type(c) for c in trainer.callbacks]
    assert kinds.index(PruningCallback) < kinds.index(PreemptionCheckpoint) < kinds.index(ModelCheckpoint)
    add_preemption_checkpoint_under_slurm(trainer)  # a second call, or a recipe that lists one: no second
    assert [type(c) for c in trainer.callbacks].count(PreemptionCheckpoint) == 1
