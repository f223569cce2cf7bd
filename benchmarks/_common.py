"""What several benchmarks share: the offline MiniLM teacher, the docstrings corpus and its held-out batches."""

from __future__ import annotations

import itertools

import torch

from lightning_kd import PretrainingDataModule

TEACHER = "sentence-transformers/all-MiniLM-L6-v2"


def held_out_batches(count: int = 4, seed: int = 1234, batch_size: int = 8,
                     max_length: int = 128) -> list[dict[str, torch.Tensor]]:
    """``count`` fixed docstring batches, from a stream order no training run uses (seed 1234)."""
    held_out = PretrainingDataModule(TEACHER, sources=["docstrings"], max_length=max_length,
                                     batch_size=batch_size, seed=seed)
    held_out.setup("fit")
    return list(itertools.islice(iter(held_out.train_dataloader()), count))
