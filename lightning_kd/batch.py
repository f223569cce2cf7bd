"""The batch contract: what every DataModule yields and every lightning-kd module reads.

A batch is a mapping of tensors:

- ``input_ids`` ``[B, T]`` (required) and ``attention_mask`` ``[B, T]`` (all ones when absent);
- ``token_type_ids`` ``[B, T]`` for models that take segments;
- ``labels``: ``[B, T]`` token labels for masked-LM (``IGNORE_INDEX`` where no loss reads), ``[B]`` class ids
  or scores for sequence classification;
- ``prediction_positions`` (optional): the flat indices of the positions a prediction loss reads, computed by
  the collate function on the host so that the prediction heads run only there;
- ``idx`` for test sets whose predictions are written back by example index.

DataModules produce it (``lightning_kd.datamodules``), the objective and the modules read it; it lives here, below
both, so neither has to import the other for a key name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

IGNORE_INDEX = -100
# The batch key under which a collate function hands over the flat indices of the positions a loss reads.
PREDICTION_POSITIONS = "prediction_positions"


def prediction_positions(labels: Tensor) -> Tensor:
    """Flat indices (into batch x sequence, row-major) of the tokens an MLM loss reads: ``labels != -100``.

    A collate function computes them on the host, where it costs nothing (:func:`with_prediction_positions`);
    computed on a GPU, ``nonzero`` waits for the device, since the count decides the output's shape.
    """
    return (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def with_prediction_positions(batch: dict[str, Any], labels: torch.Tensor | None = None) -> dict[str, Any]:
    """``batch`` with ``prediction_positions``: the flat indices of its MLM-labelled tokens (``labels != -100``;
    ``labels`` defaults to ``batch["labels"]``).

    Collate functions call this on the host, where it is free: the module then runs both models' prediction
    heads at those positions only, without computing them on the device (which waits for it: a ``nonzero``).
    """
    batch[PREDICTION_POSITIONS] = prediction_positions(batch["labels"] if labels is None else labels)
    return batch


def as_arrays(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with its tensors as numpy arrays, as a collate function running in a DataLoader worker returns it.

    Arrays pickle by value through the worker's pipe. A tensor crosses through a shared-memory segment of its
    own instead, whose file descriptor the main process then fetches from the worker over a socket: 1.6 ms per
    32 x 128 MLM batch on a 2-core machine, four times the making of the batch, which held a worker to 1.9 M
    tokens/s (4.5 M as arrays, ``benchmarks/data_throughput.py``). :func:`as_tensors` turns them back.
    """
    return {key: value.numpy() if isinstance(value, Tensor) else value for key, value in batch.items()}


def as_tensors(batch: dict[str, Any], pin_memory: bool = False) -> dict[str, Any]:
    """The arrays of a batch from :func:`as_arrays` as tensors again (sharing their memory), page-locked when
    ``pin_memory`` asks and an accelerator is there (the DataLoader's pinning thread passes arrays by)."""
    pin = pin_memory and torch.accelerator.is_available()
    for key, value in batch.items():
        if isinstance(value, np.ndarray):
            tensor = torch.from_numpy(value)
            batch[key] = tensor.pin_memory() if pin else tensor
    return batch


def complete_batch(batch: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """``batch`` with an all-ones ``attention_mask`` when it has none (what the models assume then), or an error
    naming what a batch must hold."""
    if "input_ids" not in batch:
        raise KeyError(
            f"a batch needs 'input_ids' (and usually 'attention_mask', 'labels'); this one has "
            f"{sorted(batch)}. Check the DataModule's collate function."
        )
    if "attention_mask" in batch:
        return batch
    return {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}
