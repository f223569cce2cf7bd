"""Fixed labelled batches for the TED tests (the tiny classifiers are in tests/tiny_models.py)."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import torch
from kd_helpers import ResumableLoader
from tiny_models import CLASSIFIER_ARCHITECTURES as ARCHITECTURES  # noqa: F401  (the TED tests import them from here)
from tiny_models import VOCAB, tiny_classifier  # noqa: F401
from torch.utils.data import DataLoader


def labelled_batch(
    num_labels: int, batch_size: int = 4, seq: int = 10, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random tokens with padding on every other row; labels follow the first real token, so there is a task."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (batch_size, seq), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::2, seq - 3 :] = 0
    input_ids[attention_mask == 0] = 1
    if num_labels == 1:
        labels = input_ids[:, 1].float() / VOCAB * 5
    else:
        labels = input_ids[:, 1] % num_labels
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class LabelledBatches(L.LightningDataModule):
    """Fixed batches with a GLUE-like ``task`` (its ``num_labels``), repeated in the same order every epoch."""

    def __init__(self, num_labels: int = 3, num_batches: int = 2, task_labels: int | None = None) -> None:
        super().__init__()
        labels = task_labels or num_labels
        # a real task name, so the module's GLUE metrics build; no validation runs here
        name = {1: "stsb", 2: "sst2", 3: "mnli"}.get(labels, "docstrings")
        self.task = SimpleNamespace(name=name, num_labels=labels)
        self.batches = [labelled_batch(num_labels, seed=i) for i in range(num_batches)]

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(self.batches)  # a checkpoint taken mid-epoch resumes at the next batch


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


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if not torch.equal(before[name], p.detach())}
