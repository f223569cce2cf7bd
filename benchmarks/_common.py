"""What several benchmarks share: the offline MiniLM teacher, the docstrings corpus and its held-out batches, and a
callback timing every training step."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import lightning as L
import torch

from lightning_kd import PretrainingDataModule

TEACHER = "sentence-transformers/all-MiniLM-L6-v2"


def held_out_batches(
    count: int = 4, seed: int = 1234, batch_size: int = 8, max_length: int = 128
) -> list[dict[str, torch.Tensor]]:
    """``count`` fixed docstring batches, from a stream order no training run uses (seed 1234)."""
    held_out = PretrainingDataModule(
        TEACHER, sources=["docstrings"], max_length=max_length, batch_size=batch_size, seed=seed
    )
    held_out.setup("fit")
    return list(itertools.islice(iter(held_out.train_dataloader()), count))


class StepTimer(L.Callback):
    """Wall time (or another ``clock``'s) of every training step, whatever other callbacks do in it (put it after
    them)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.times: list[float] = []
        self.clock = clock

    def on_train_batch_start(self, *args: object) -> None:
        self.start = self.clock()

    def on_train_batch_end(self, *args: object) -> None:
        self.times.append(self.clock() - self.start)
