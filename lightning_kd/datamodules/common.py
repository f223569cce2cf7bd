"""Pieces both DataModules share: tokenizer loading, the vocabulary check, and where a process sits in DDP."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..hub import load_tokenizer
from ..objective import PREDICTION_POSITIONS, prediction_positions


def get_tokenizer(tokenizer: str | os.PathLike | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A fast tokenizer from a hub name, a local folder, or an already built tokenizer."""
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        loaded = tokenizer
    else:
        loaded = load_tokenizer(tokenizer)
    if not loaded.is_fast:
        raise ValueError(
            f"{type(loaded).__name__} is a slow (pure Python) tokenizer; the DataModules need a fast one "
            "(a tokenizer.json). Convert it once with `AutoTokenizer.from_pretrained(name, use_fast=True)"
            ".save_pretrained(folder)` and pass the folder."
        )
    return loaded


def with_prediction_positions(batch: dict[str, Any], labels: torch.Tensor | None = None) -> dict[str, Any]:
    """``batch`` with ``prediction_positions``: the flat indices of its MLM-labelled tokens (``labels != -100``;
    ``labels`` defaults to ``batch["labels"]``).

    Collate functions call this on the host, where it is free: the module then runs both models' prediction
    heads at those positions only, without computing them on the device (which waits for it: a ``nonzero``).
    """
    batch[PREDICTION_POSITIONS] = prediction_positions(batch["labels"] if labels is None else labels)
    return batch


def pin_memory_default(trainer: Any) -> bool:
    """Page-locked batches when training on CUDA: Lightning then copies them with ``non_blocking=True`` and the
    host does not wait for the device at every batch; on a CPU pinning is only a cost."""
    strategy = getattr(trainer, "strategy", None)
    device = getattr(strategy, "root_device", None)
    return device is not None and device.type == "cuda"


def distributed_position(trainer: Any = None) -> tuple[int, int]:
    """(rank, world size): from the trainer when attached, else from torch.distributed, else (0, 1)."""
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _embedding_rows(model: nn.Module) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            embeddings = get()
        except (NotImplementedError, AttributeError):
            embeddings = None
        if isinstance(embeddings, nn.Embedding):
            return embeddings.num_embeddings
    config = getattr(model, "config", None)
    return getattr(config, "vocab_size", None)


def models_of(module: nn.Module) -> dict[str, nn.Module]:
    """The Hugging Face models a LightningModule holds, by attribute name (teacher, student, model...)."""
    found = {}
    for name in ("teacher", "student", "model"):
        candidate = getattr(module, name, None)
        if isinstance(candidate, nn.Module) and _embedding_rows(candidate) is not None:
            found[name] = candidate
    if not found and _embedding_rows(module) is not None:
        found["model"] = module
    return found


def check_vocabulary(tokenizer: PreTrainedTokenizerBase, module: nn.Module | None) -> None:
    """Fail before training when the tokenizer can produce ids the model's embedding table does not have.

    A larger tokenizer would index past the embeddings (a CUDA assert or a CPU IndexError deep inside the
    forward pass); a smaller one is allowed, as models often pad their vocabulary to a multiple of 8.
    """
    if module is None:
        return
    size = len(tokenizer)
    for name, model in models_of(module).items():
        rows = _embedding_rows(model)
        if rows is not None and size > rows:
            raise ValueError(
                f"the tokenizer has {size} tokens but the {name}'s embedding table has {rows} rows: "
                f"ids {rows}..{size - 1} would index past it. Use the tokenizer the {name} was trained with "
                "(the same hub name or folder as the model), or resize the model with "
                "model.resize_token_embeddings(len(tokenizer)) before training."
            )
