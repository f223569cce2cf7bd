"""Turning packed, masked batches back into the documents they hold, and a quiet trainer for the data tests."""

from __future__ import annotations

import inspect
import itertools
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from transformers import PreTrainedTokenizerBase

from lightning_kd.datamodules.masking import unpack
from lightning_kd.datamodules.pretraining import POSITION_KEY


def unmask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])


def documents_by_reader(
    batches: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, partial: bool = False
) -> dict[int, list[str]]:
    """Per reader, the documents in its stream, in order: blocks joined, split on [SEP]."""
    streams: dict[int, list[int]] = defaultdict(list)
    for batch in batches:
        batch = unpack(dict(batch))
        (reader,) = batch[POSITION_KEY]
        ids = unmask(batch)
        for row, mask in zip(ids, batch["attention_mask"], strict=True):
            tokens = row[mask.bool()].tolist()
            assert tokens[0] == tokenizer.cls_token_id and tokens[-1] == tokenizer.sep_token_id
            streams[reader].extend(tokens[1:-1])
    result = {}
    for reader, tokens in streams.items():
        docs, current = [], []
        for token in tokens:
            if token == tokenizer.sep_token_id:
                docs.append(tokenizer.decode(current))
                current = []
            else:
                current.append(token)
        assert partial or not current, "a stream ends in the middle of a document"
        result[reader] = docs
    return result


def normalised(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[str]:
    return [tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]


def data_trainer(root: Path, max_steps: int, **kwargs: object) -> L.Trainer:
    """A CPU trainer that logs and prints nothing, for runs that only exercise the data."""
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kwargs,
    )


def dev_predictions(model: torch.nn.Module, loader: Any, batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The classes ``model`` predicts on the first ``batches`` batches of a GLUE dev loader, and their labels:
    what a logged accuracy or F1 must agree with, computed here without the library's metrics."""
    model.eval()
    accepted = set(inspect.signature(model.forward).parameters)
    predictions, labels = [], []
    with torch.no_grad():
        for batch in itertools.islice(loader, batches):
            inputs = {k: v for k, v in batch.items() if k in accepted and k != "labels"}
            predictions.append(model(**inputs).logits.argmax(dim=-1))
            labels.append(batch["labels"])
    return torch.cat(predictions), torch.cat(labels)
