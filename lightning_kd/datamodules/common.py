"""Pieces both DataModules share: tokenizer loading, the vocabulary check, and where a process sits in DDP."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lightning_kd.datamodules.glue_metrics import TaskMetrics
from lightning_kd.datamodules.squad_metrics import SquadMetrics
from lightning_kd.datamodules.squad_tasks import SquadTask
from lightning_kd.hub import load_tokenizer, resolve_pretrained


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


def vocabulary_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the token -> id table: two tokenizers with the same one make the same ids."""
    table = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(table.encode("utf-8")).hexdigest()[:16]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spm.model", "vocab.json")
# models round their embedding table up (to a multiple of 8, 64 or 128); more spare rows than this mean the
# table was made for another, larger vocabulary
SPARE_ROWS = 256


def _own_tokenizer(model: nn.Module) -> tuple[str, PreTrainedTokenizerBase] | None:
    """The tokenizer saved beside the model's weights, when its folder (or packaged hub copy) has one."""
    source = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    folder = Path(resolve_pretrained(source)) if source else None
    if folder is None or not folder.is_dir() or not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return source, load_tokenizer(folder)
    except (OSError, ValueError):
        return None


def check_vocabulary(tokenizer: PreTrainedTokenizerBase, module: nn.Module | None) -> None:
    """Fail before training unless the tokenizer makes the ids each model was trained on.

    Refused: a tokenizer other than the one saved with the model (another token -> id table), a padding id
    other than the model's, a tokenizer larger than the embedding table (ids would index past it: a CUDA assert
    or an IndexError deep inside the forward pass), and one far smaller than the table when the model's own
    tokenizer is not at hand (a BERT tokenizer feeding a DeBERTa-v3 model, say). A few spare rows are allowed:
    models round their tables up.
    """
    if module is None:
        return
    size = len(tokenizer)
    mine = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    fix = "Use the tokenizer the {name} was trained with (the same hub name or folder as the model)"
    for name, model in models_of(module).items():
        rows = _embedding_rows(model)
        if rows is not None and size > rows:
            raise ValueError(
                f"the tokenizer has {size} tokens but the {name}'s embedding table has {rows} rows: "
                f"ids {rows}..{size - 1} would index past it. {fix.format(name=name)}, or resize the model with "
                "model.resize_token_embeddings(len(tokenizer)) before training."
            )
        own = _own_tokenizer(model)
        if own is not None and vocabulary_hash(own[1]) != vocabulary_hash(tokenizer):
            raise ValueError(
                f"the data's tokenizer {mine!r} is not the {name}'s own ({own[0]!r}: another token -> id table), "
                f"so every id would mean another word to it. {fix.format(name=name)}: tokenizer: {own[0]}."
            )
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        if pad is not None and tokenizer.pad_token_id is not None and pad != tokenizer.pad_token_id:
            raise ValueError(
                f"the data's tokenizer {mine!r} pads with id {tokenizer.pad_token_id}, but the {name} was trained "
                f"with padding id {pad}: they do not share a vocabulary. {fix.format(name=name)}."
            )
        if own is None and rows is not None and rows - size > SPARE_ROWS:
            raise ValueError(
                f"the data's tokenizer {mine!r} has {size} tokens but the {name}'s embedding table has {rows} rows: "
                f"the {name} was trained with another, larger vocabulary. {fix.format(name=name)}."
            )


def task_metrics(datamodule: Any, prefix: str = "val") -> nn.Module | None:
    """The official metrics of the DataModule's task, or None when it has none (pre-training text).

    GLUE's are :class:`~lightning_kd.datamodules.glue_metrics.TaskMetrics`; SQuAD's,
    :class:`~lightning_kd.datamodules.squad_metrics.SquadMetrics`, score against the DataModule's evaluation set
    (its ``predict`` set for ``prefix="predict"``). Both take ``update(logits, batch[metrics.target_key],
    dataloader_idx)``, ``compute()`` and ``reset()``.
    """
    task = getattr(datamodule, "task", None)
    if task is None:
        return None
    if isinstance(task, SquadTask):
        split = "predict" if prefix == "predict" else "validation"
        options = getattr(datamodule, "answer_options", {})
        return SquadMetrics(datamodule.evaluation_set(split), task.name, prefix=prefix, **options)
    return TaskMetrics.for_task(task.name, prefix=prefix)


def rows_loader(
    rows: list[dict[str, Any]],
    batch_size: int,
    shuffle: bool,
    seed: int,
    collate: Any,
    num_workers: int,
    trainer: Any,
) -> DataLoader:
    """A DataLoader over a task's tokenised rows: shuffled by a generator seeded with ``seed`` (a run's order
    does not depend on the global RNG), pinned where the trainer runs on CUDA."""
    return DataLoader(
        rows,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory_default(trainer),
    )
