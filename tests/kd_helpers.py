"""Batches, DataModules and trainers shared by the tests (the tiny models are in tiny_models.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from tiny_models import VOCAB, tiny_bert_config  # noqa: F401  (imported from here by many tests)
from torch.utils.data import DataLoader

from lightning_kd.objective import Features, KnowledgeTerm, Needs


def make_batch(batch_size: int = 4, seq: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random MLM batch with some padding at the end of every other row."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (batch_size, seq), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::2, seq - 3 :] = 0
    input_ids[attention_mask == 0] = 0
    labels = torch.full_like(input_ids, -100)
    chosen = (torch.rand(batch_size, seq, generator=generator) < 0.3) & attention_mask.bool()
    chosen[:, 1] = True
    labels[chosen] = input_ids[chosen]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class FixedBatches(L.LightningDataModule):
    """A few fixed batches, repeated: enough to train, resume and compare runs exactly."""

    def __init__(self, num_batches: int = 4, batch_size: int = 4, seq: int = 10) -> None:
        super().__init__()
        self.batches = [make_batch(batch_size, seq, seed=i) for i in range(num_batches)]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None, shuffle=False)


class ResumableLoader(DataLoader):
    """A DataLoader over fixed batches that Lightning can resume mid-epoch: its ``state_dict`` (which Lightning
    stores in the checkpoint) holds how many batches of the epoch it has handed out, and the first epoch after
    ``load_state_dict`` yields the rest. A plain DataLoader would restart the epoch at its first batch."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        super().__init__(batches, batch_size=None, shuffle=False)
        self.given = 0
        self.resume_at = 0

    def __iter__(self):  # noqa: ANN204
        start, self.resume_at = self.resume_at, 0
        self.given = start
        for batch in self.dataset[start:]:
            self.given += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"given": self.given}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_at = state["given"]


class ResumableBatches(FixedBatches):
    """``FixedBatches`` whose loader resumes where a checkpoint stopped, even in the middle of an epoch: a run
    resumed from any step sees the same batches as one that never stopped."""

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(self.batches)


def quiet_trainer(**kwargs: object) -> L.Trainer:
    settings = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    settings.update(kwargs)
    return L.Trainer(**settings)


class StopAt(L.Callback):
    """Interrupts a run after ``step`` optimizer steps, as a preempted job would stop."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class BadLossAt(KnowledgeTerm):
    """A term of 0 with a gradient path, except on call ``bad`` (0-based): NaN there, its gradient NaN too; or,
    with ``finite_gradient``, inf in value only, its gradient still 0 (a step skipped for its loss alone). Neither
    makes the host wait for the device."""

    kind = "bad_loss_at"

    def __init__(self, bad: int, finite_gradient: bool = False) -> None:
        super().__init__(weight=1.0)
        self.bad, self.finite_gradient, self.calls = bad, finite_gradient, 0

    def needs(self) -> Needs:
        return Needs(hidden_states=True)

    def forward(
        self, teacher: Features, student: Features, batch: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        call, self.calls = self.calls, self.calls + 1
        zero = student.hidden_states[-1].sum() * 0.0
        if call != self.bad:
            return zero
        return zero + float("inf") if self.finite_gradient else student.hidden_states[-1].sum() * float("nan")


def run_ranks_script(script: Path, cwd: Path, *args: str) -> None:
    """Run a test script that starts its own ranks (one thread each), in ``cwd``; its output names a failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=600, cwd=cwd
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
