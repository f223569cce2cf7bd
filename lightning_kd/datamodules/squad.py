"""SQuAD v1.1 and v2.0 for extractive question answering: windows over long contexts, span labels, and what
the evaluation needs to turn a model's start and end logits back into answer texts.

A context longer than a window is split into windows that overlap by ``doc_stride`` tokens, each holding the
question first and a slice of the context after it. Every window is labelled with the token span of its
question's first gold answer, or with the CLS token at index 0 for both start and end when the answer is not
wholly inside the window or the question has none; BERT's ``run_squad.py`` and Hugging Face's ``run_qa.py``
label windows this way, for v1.1 too, so the model learns to point at CLS in a window without the answer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_kd.datamodules.common import check_vocabulary, get_tokenizer, rows_loader
from lightning_kd.datamodules.sources import DataSourceError, load_hub_dataset
from lightning_kd.datamodules.squad_files import (
    SquadExample,
    answer_span,
    fix_train_answers,
    hub_examples,
    read_squad_json,
)
from lightning_kd.datamodules.squad_tasks import SquadReference, get_squad_task

# questions are tokenised in chunks so that one call's encodings of a large split stay small
CHUNK = 2000


def truncated_questions(
    tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], max_query_length: int
) -> list[str]:
    """Questions without leading whitespace (byte-level BPE would make it a token of its own), cut to at most
    ``max_query_length`` tokens at a token boundary."""
    out = [q.lstrip() for q in questions]
    pending = list(range(len(out)))
    while pending:
        encoded = tokenizer(
            [out[i] for i in pending], add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
        longer = []
        for i, offsets in zip(pending, encoded["offset_mapping"], strict=True):
            if len(offsets) > max_query_length:
                # re-tokenising the cut text can split its last word differently: cut again until it fits,
                # always shorter, so this ends
                out[i] = out[i][: min(offsets[max_query_length - 1][1], len(out[i]) - 1)]
                longer.append(i)
        pending = longer
    return out


def encode_windows(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[SquadExample],
    max_length: int,
    doc_stride: int,
    max_query_length: int,
) -> tuple[list[dict[str, Any]], list[int], list[list[tuple[int, int]]]]:
    """Each question's windows as rows with span labels, each window's question index, each window's token
    offsets (``(-1, -1)`` outside the context)."""
    rows: list[dict[str, Any]] = []
    window_question: list[int] = []
    window_offsets: list[list[tuple[int, int]]] = []
    for first in range(0, len(examples), CHUNK):
        chunk = examples[first : first + CHUNK]
        encoded = tokenizer(
            truncated_questions(tokenizer, [e.question for e in chunk], max_query_length),
            [e.context for e in chunk],
            truncation="only_second",
            max_length=max_length,
            stride=doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            verbose=False,
        )
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        for window, index in enumerate(encoded["overflow_to_sample_mapping"]):
            example = chunk[index]
            sequence = encoded.sequence_ids(window)
            offsets = [
                (int(a), int(b)) if sequence[t] == 1 else (-1, -1)
                for t, (a, b) in enumerate(encoded["offset_mapping"][window])
            ]
            span = (
                answer_span(example.context, example.answers[0], example.starts[0])
                if example.answers
                else None
            )
            start, end = _label(offsets, span)
            rows.append(
                {**{k: encoded[k][window] for k in keys}, "start_positions": start, "end_positions": end}
            )
            window_question.append(first + index)
            window_offsets.append(offsets)
    return rows, window_question, window_offsets


def _label(offsets: list[tuple[int, int]], span: tuple[int, int] | None) -> tuple[int, int]:
    """The first and last context tokens overlapping the answer's characters when the window's context
    covers all of them; else (0, 0), the CLS token."""
    context = [t for t, (a, _) in enumerate(offsets) if a >= 0]
    if span is None or not context:
        return 0, 0
    begin, stop = span
    if offsets[context[0]][0] > begin or offsets[context[-1]][1] < stop:
        return 0, 0
    inside = [t for t in context if offsets[t][0] < stop and offsets[t][1] > begin]
    return (inside[0], inside[-1]) if inside else (0, 0)


class SQuADDataModule(L.LightningDataModule):
    """SQuAD v1.1 or v2.0 as windows with span labels (``start_positions``, ``end_positions``), dynamically
    padded.

    Args:
        version: ``v1.1`` or ``v2.0`` (``1.1``, ``squad``, ``2.0``, ``squad_v2`` also work).
        tokenizer: hub name or folder of the model's fast tokenizer, or the tokenizer itself.
        data_dir: a folder with the official ``train-<version>.json`` and ``dev-<version>.json``; ``None``: the
            hub (``rajpurkar/squad``, ``rajpurkar/squad_v2``); ``"docstrings"``: an offline stand-in task.
        max_length: tokens in a window: question, context slice and special tokens.
        doc_stride: tokens two consecutive windows of a context share.
        max_query_length: questions are cut to this many tokens.
        predict_file: a JSON in the official layout (answers optional) that ``predict`` answers; ``None``: the
            dev set.
        n_best, max_answer_length, null_score_diff_threshold: how answers are read from the logits (see
            :func:`~lightning_kd.datamodules.squad_postprocess.postprocess`): the start and end candidates per
            window, the longest answer in tokens, and (v2.0) how much the null score must beat the best span by
            for "no answer". The usual values, those of BERT's and Hugging Face's SQuAD scripts.

    Windows without their question's answer, and all windows of an unanswerable question, are labelled with
    the CLS token (index 0) as start and end, as BERT's ``run_squad.py`` and Hugging Face's ``run_qa.py`` do
    for v1.1 too. ``validate`` and ``test`` both run on the dev set: SQuAD's test set is hidden, scored only by
    its authors. `evaluation_set` gives what turns the logits of a split's windows into answers.
    """

    def __init__(
        self,
        version: str,
        tokenizer: str | PreTrainedTokenizerBase,
        data_dir: str | None = None,
        max_length: int = 384,
        doc_stride: int = 128,
        max_query_length: int = 64,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        predict_file: str | None = None,
        n_best: int = 20,
        max_answer_length: int = 30,
        null_score_diff_threshold: float = 0.0,
    ) -> None:
        super().__init__()
        self.task = get_squad_task(version)
        for name, value, least in (
            ("max_length", max_length, 2),
            ("max_query_length", max_query_length, 1),
            ("batch_size", batch_size, 1),
            ("doc_stride", doc_stride, 0),
            ("n_best", n_best, 1),
            ("max_answer_length", max_answer_length, 1),
        ):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}")
        self.tokenizer_name = tokenizer
        self.data_dir = data_dir
        self.max_length = max_length
        self.doc_stride = doc_stride
        self.max_query_length = max_query_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.predict_file = predict_file
        self.answer_options = {
            "n_best": n_best,
            "max_answer_length": max_answer_length,
            "null_score_diff_threshold": float(null_score_diff_threshold),
        }
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.datasets: dict[str, list[dict[str, Any]]] = {}
        self._references: dict[str, SquadReference] = {}
        # no tokenizer adds a negative number of special tokens: a bound that holds for every tokenizer
        self._check_room(0)
        if isinstance(tokenizer, PreTrainedTokenizerBase):
            self._check_room(tokenizer.num_special_tokens_to_add(pair=True))

    def _check_room(self, specials: int) -> None:
        room = self.max_length - self.max_query_length - specials
        how = f"max_length {self.max_length} - max_query_length {self.max_query_length} - {specials} special tokens"
        if room < 1:
            raise ValueError(
                f"max_length={self.max_length} leaves no room for context after a question of up to "
                f"max_query_length={self.max_query_length} tokens and the {specials} special tokens of a pair "
                f"({how} = {room}): raise max_length above {self.max_query_length + specials} (384 is usual) or "
                "lower max_query_length"
            )
        if self.doc_stride >= room:
            raise ValueError(
                f"doc_stride={self.doc_stride} is not below the room for context in a window ({how} = {room}), so "
                f"windows would not advance through a long context: use a doc_stride of at most {room - 1} "
                "(128 with max_length 384 is usual), or raise max_length"
            )

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            tokenizer = get_tokenizer(self.tokenizer_name)
            self._check_room(tokenizer.num_special_tokens_to_add(pair=True))
            self._tokenizer = tokenizer
        return self._tokenizer

    def _folder(self) -> Path:
        if self.data_dir == "docstrings":
            from lightning_kd.datamodules.squad_docstrings import write_docstring_squad

            return Path(write_docstring_squad(self.task.version))
        folder = Path(os.fspath(self.data_dir)).expanduser()  # type: ignore[arg-type]
        if not folder.is_dir():
            raise DataSourceError(
                f"data_dir {folder}: no such folder; pass the folder holding SQuAD's {self.task.train_file} and "
                f"{self.task.dev_file}, data_dir=None for the hub, or 'docstrings' for the offline stand-in"
            )
        return folder

    def _file(self, name: str) -> Path:
        folder = self._folder()
        path = folder / name
        if not path.is_file():
            other = get_squad_task("v1.1" if self.task.version_2 else "v2.0")
            found = [f for f in (other.train_file, other.dev_file) if (folder / f).is_file()]
            hint = (
                f"; the folder holds {found[0]}: pass version='{other.version}' to read it" if found else ""
            )
            raise DataSourceError(
                f"{folder}: no {name}; SQuAD {self.task.version} reads the official files {self.task.train_file} "
                f"and {self.task.dev_file} from data_dir{hint}"
            )
        return path

    def read_split(self, split: str) -> list[SquadExample]:
        """The questions of ``train``, ``validation`` (the dev set) or ``predict``."""
        if split not in ("train", "validation", "predict"):
            raise ValueError(f"unknown SQuAD split {split!r}: use train, validation or predict")
        if split == "predict" and self.predict_file is not None:
            return read_squad_json(self.predict_file, self.task.version_2, labelled=False)
        split = "validation" if split == "predict" else split
        if self.data_dir is None:
            dataset = load_hub_dataset(self.task.hub, None, split)
            examples = hub_examples(dataset, self.task.version_2, f"{self.task.hub} ({split})")
            source = f"{self.task.hub} ({split})"
        else:
            path = self._file(self.task.train_file if split == "train" else self.task.dev_file)
            examples, source = read_squad_json(path, self.task.version_2), str(path)
        return fix_train_answers(examples, source) if split == "train" else examples

    @override
    def setup(self, stage: str | None = None) -> None:
        # the tokenizer first: a window size its special tokens leave no room for fails before any reading
        tokenizer = self.tokenizer
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            check_vocabulary(tokenizer, trainer.lightning_module)
        splits = {"predict": ["predict"], "validate": ["validation"], "test": ["validation"]}.get(
            stage or "fit", ["train", "validation"]
        )
        for split in splits:
            if split not in self.datasets:
                self._build(split)

    def _build(self, split: str) -> None:
        examples = self.read_split(split)
        rows, window_question, offsets = encode_windows(
            self.tokenizer, examples, self.max_length, self.doc_stride, self.max_query_length
        )
        if split == "train":
            self.datasets[split] = rows
            return
        table = torch.full((len(rows), self.max_length, 2), -1, dtype=torch.int32)
        for window, (row, spans) in enumerate(zip(rows, offsets, strict=True)):
            row["window"] = window
            table[window, : len(spans)] = torch.tensor(spans, dtype=torch.int32).view(len(spans), 2)
        self._references[split] = SquadReference(
            ids=[e.id for e in examples],
            contexts=[e.context for e in examples],
            answers=[list(e.answers) for e in examples],
            window_question=torch.tensor(window_question, dtype=torch.long),
            offsets=table,
            version_2=self.task.version_2,
        )
        self.datasets[split] = rows

    def evaluation_set(self, split: str = "validation") -> SquadReference:
        """The ids, contexts, gold answers, window -> question map and token offsets of ``validation`` or
        ``predict``, for `squad_postprocess.postprocess` and the metrics."""
        if split not in ("validation", "predict"):
            raise ValueError(f"no evaluation set for {split!r}: use 'validation' or 'predict'")
        if split not in self._references:
            self.setup("predict" if split == "predict" else "validate")
        return self._references[split]

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Pads to the longest row of the batch, not to max_length."""
        length = max(len(row["input_ids"]) for row in rows)
        pad = self.tokenizer.pad_token_id or 0
        batch = {"input_ids": torch.full((len(rows), length), pad, dtype=torch.long)}
        for key in ("attention_mask", "token_type_ids"):
            if key in rows[0]:
                batch[key] = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            for key, tensor in batch.items():
                tensor[i, :n] = torch.tensor(row[key], dtype=torch.long)
        for key in ("start_positions", "end_positions", "window"):
            if key in rows[0]:
                batch[key] = torch.tensor([row[key] for row in rows], dtype=torch.long)
        return batch

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "predict": "predict"}.get(split, "validate"))
        return rows_loader(
            self.datasets[split],
            self.batch_size if shuffle else self.eval_batch_size,
            shuffle,
            self.seed,
            self.collate,
            self.num_workers,
            getattr(self, "trainer", None),
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        """The dev set: SQuAD's test set is hidden, so ``test`` scores what can be scored."""
        return self._loader("validation", shuffle=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)
