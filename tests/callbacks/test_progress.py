"""The CLI's progress bar counts steps in a run bounded by max_steps, where Lightning's read "Epoch 0/-2"."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_kd.callbacks.progress import (
    StepRichProgressBar,
    StepTQDMProgressBar,
    step_progress_bar,
    train_description,
)


class Stream(IterableDataset):
    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield torch.randn(4)


class Tiny(L.LightningModule):
    def __init__(self, stream: bool) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.stream = stream

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, list) else batch
        return self.layer(x).pow(2).mean()

    def train_dataloader(self) -> DataLoader:
        data = Stream() if self.stream else TensorDataset(torch.randn(6, 4))
        return DataLoader(data, batch_size=2)  # 3 batches an epoch when sized

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(bar: L.Callback, stream: bool, **trainer: object) -> L.Trainer:
    trainer.setdefault("logger", False)
    run = L.Trainer(
        accelerator="cpu",
        callbacks=[bar],
        enable_checkpointing=False,
        enable_model_summary=False,
        **trainer,
    )
    run.fit(Tiny(stream))
    return run


@pytest.mark.parametrize(
    ("max_epochs", "max_steps", "expected"),
    [(-1, 150, "Training steps"), (None, 150, "Training steps"), (3, 150, "Epoch 1/2"), (-1, -1, "Epoch 1")],
)
def test_the_description_names_steps_only_when_steps_bound_the_run(
    max_epochs: int | None, max_steps: int, expected: str
) -> None:
    trainer = SimpleNamespace(max_epochs=max_epochs, max_steps=max_steps, current_epoch=1)
    assert train_description(trainer) == expected


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "three-batch epochs"])
def test_rich_bar_counts_steps_to_max_steps(stream: bool, tmp_path: Path) -> None:
    pytest.importorskip("rich")
    bar = StepRichProgressBar()
    trainer = fit(bar, stream, max_steps=7, logger=CSVLogger(tmp_path))
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert trainer.max_epochs == -1
    assert task.description.strip() == "Training steps"
    assert (task.completed, task.total) == (7, 7)  # not reset at each of the sized data's epochs
    assert "/-" not in task.description
    assert "v_num" not in bar.get_metrics(trainer, trainer.lightning_module)  # the log folder's number


def test_rich_bar_keeps_lightnings_epochs_when_epochs_bound_the_run() -> None:
    pytest.importorskip("rich")
    bar = StepRichProgressBar()
    fit(bar, stream=False, max_epochs=2)
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert task.description.strip() == "Epoch 1/1" and (task.completed, task.total) == (3, 3)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "three-batch epochs"])
def test_tqdm_bar_counts_steps_to_max_steps(stream: bool) -> None:
    bar = StepTQDMProgressBar()
    fit(bar, stream, max_steps=7)
    assert bar.train_progress_bar.desc.startswith("Training steps")
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (7, 7)


def test_the_bar_is_the_kind_lightning_would_choose() -> None:
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    assert isinstance(step_progress_bar(), StepRichProgressBar if _RICH_AVAILABLE else StepTQDMProgressBar)
