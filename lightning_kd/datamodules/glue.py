"""The nine GLUE tasks, from the hub (``nyu-mll/glue``) or from GLUE's original TSV files.

The TSV reader splits on tabs and nothing else: MRPC's sentences hold unbalanced double quotes that a CSV
reader would join across lines, CoLA's files have no header, and MNLI's have a dozen columns of parses
before the two sentences, so columns are found by name where a header exists.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from .common import check_vocabulary, get_tokenizer, pin_memory_default
from .docstrings import DOCSTRING_CLASSES, write_docstring_task
from .sources import DataSourceError, load_hub_dataset


@dataclass(frozen=True)
class GLUETask:
    name: str  # the hub config name
    folder: str  # the folder name in the GLUE download
    text_columns: tuple[str, ...]  # hub columns
    tsv_columns: tuple[str | int, ...]  # TSV header names, or indices where there is no header
    tsv_label: str | int
    labels: tuple[str, ...]  # TSV label strings in hub id order; () for regression
    metrics: tuple[str, ...]
    validation_files: tuple[str, ...] = ("dev.tsv",)
    validation_splits: tuple[str, ...] = ("validation",)
    has_header: bool = True

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1

    @property
    def is_regression(self) -> bool:
        return not self.labels


TASKS: dict[str, GLUETask] = {
    task.name: task
    for task in [
        GLUETask("cola", "CoLA", ("sentence",), (3,), 1, ("0", "1"), ("matthews_correlation",), has_header=False),
        GLUETask("sst2", "SST-2", ("sentence",), ("sentence",), "label", ("0", "1"), ("accuracy",)),
        GLUETask(
            "mrpc", "MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality", ("0", "1"),
            ("f1", "accuracy"),
        ),
        GLUETask(
            "qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate", ("0", "1"),
            ("f1", "accuracy"),
        ),
        GLUETask(
            "stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", (),
            ("pearson", "spearman"),
        ),
        GLUETask(
            "mnli", "MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label",
            ("entailment", "neutral", "contradiction"), ("accuracy",),
            validation_files=("dev_matched.tsv", "dev_mismatched.tsv"),
            validation_splits=("validation_matched", "validation_mismatched"),
        ),
        GLUETask(
            "qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label",
            ("entailment", "not_entailment"), ("accuracy",),
        ),
        GLUETask(
            "rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
            ("entailment", "not_entailment"), ("accuracy",),
        ),
        GLUETask("wnli", "WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", ("0", "1"), ("accuracy",)),
        # Not GLUE: an offline stand-in with the same shape (see docstrings.write_docstring_task).
        GLUETask("docstrings", "docstrings", ("sentence",), ("sentence",), "label", DOCSTRING_CLASSES, ("accuracy",)),
    ]
}  # fmt: skip


def get_task(name: str) -> GLUETask:
    """A GLUE task by any common spelling (``SST-2``, ``sst2``, ``STS-B``), or an error listing them all."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[key]


Example = tuple[tuple[str, ...], float | int]


def read_tsv(path: str | os.PathLike, task: GLUETask, skip_malformed: bool = False) -> list[Example]:
    """(texts, label) rows of a GLUE TSV file; a bad row is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataSourceError(f"{path}: no such file; a {task.folder} folder from the GLUE download holds "
                              f"train.tsv and {', '.join(task.validation_files)}")  # fmt: skip
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    first = 0
    if task.has_header:
        if not lines:
            raise DataSourceError(f"{path}: the file is empty; a header line was expected")
        header = lines[0].rstrip("\r").split("\t")
        first = 1
        try:
            text_at = [header.index(c) for c in task.tsv_columns]  # type: ignore[arg-type]
            label_at = header.index(task.tsv_label)  # type: ignore[arg-type]
        except ValueError:
            raise DataSourceError(
                f"{path}, line 1: the header {header} lacks the columns {list(task.tsv_columns)} and "
                f"{task.tsv_label!r} of GLUE's {task.folder} files"
            ) from None
        width = len(header)
    else:
        text_at, label_at = list(task.tsv_columns), int(task.tsv_label)  # type: ignore[arg-type]
        width = max(*text_at, label_at) + 1
    examples: list[Example] = []
    for number in range(first, len(lines)):
        line = lines[number].rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            if len(fields) < width or (task.has_header and len(fields) > width and task.name != "mnli"):
                raise ValueError(f"expected {width} tab-separated columns, found {len(fields)}")
            examples.append(([fields[i] for i in text_at], _label(task, fields[label_at])))
        except ValueError as error:
            message = f"{path}, line {number + 1}: {error}"
            if not skip_malformed:
                raise DataSourceError(message + " (pass skip_malformed=True to skip such rows)") from None
            warnings.warn(f"skipped a malformed row: {message}", stacklevel=2)
    if not examples:
        raise DataSourceError(f"{path}: no examples in the file")
    return examples


def _label(task: GLUETask, value: str) -> float | int:
    value = value.strip()
    if task.is_regression:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"the score {value!r} is not a number") from None
    if value not in task.labels:
        raise ValueError(f"the label {value!r} is not one of {list(task.labels)}")
    return task.labels.index(value)


def task_folder(data_dir: str | os.PathLike, task: GLUETask) -> Path:
    """The task's folder: ``data_dir`` itself, or its ``CoLA``/``SST-2``/... sub-folder (any case)."""
    root = Path(data_dir).expanduser()
    if (root / "train.tsv").exists() or (root / task.validation_files[0]).exists():
        return root
    if root.is_dir():
        for child in sorted(root.iterdir()):
            if child.is_dir() and child.name.lower().replace("-", "") == task.folder.lower().replace("-", ""):
                return child
    raise DataSourceError(
        f"no GLUE {task.folder} files in {root}: pass the task's folder (holding train.tsv and "
        f"{', '.join(task.validation_files)}) or the glue_data folder that holds {task.folder}/"
    )


class GLUEDataModule(L.LightningDataModule):
    """A GLUE task, tokenised once, with dynamic padding; MNLI validates on matched and mismatched.

    Args:
        task: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte or wnli (``SST-2``, ``STS-B`` also work); or
            ``docstrings``, an offline 6-class task (which stdlib package a docstring is from), no data_dir needed.
        tokenizer: hub name or folder of the model's fast tokenizer.
        data_dir: a folder in GLUE's TSV layout (the task folder or ``glue_data``); ``None``: the hub.
        skip_malformed: warn and skip rows with the wrong number of columns or a bad label, instead of failing.
    """

    def __init__(
        self,
        task: str,
        tokenizer: str | PreTrainedTokenizerBase,
        data_dir: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        skip_malformed: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.task = get_task(task)
        self.tokenizer_name = tokenizer
        self.data_dir = data_dir
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.skip_malformed = skip_malformed
        self.seed = seed
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.datasets: dict[str, list[dict[str, Any]]] = {}

    @property
    def task_name(self) -> str:
        return self.task.name

    @property
    def num_labels(self) -> int:
        return self.task.num_labels

    @property
    def is_regression(self) -> bool:
        return self.task.is_regression

    @property
    def validation_names(self) -> list[str]:
        return list(self.task.validation_splits)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = get_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def read_split(self, split: str) -> list[Example]:
        """Raw (texts, label) examples of ``train`` or one of ``validation_names``."""
        if self.data_dir is not None or self.task.name == "docstrings":
            if self.data_dir is None:
                folder = write_docstring_task()
            else:
                folder = task_folder(self.data_dir, self.task)
            file = (
                "train.tsv"
                if split == "train"
                else self.task.validation_files[self.validation_names.index(split)]
            )
            return read_tsv(folder / file, self.task, self.skip_malformed)
        dataset = load_hub_dataset("nyu-mll/glue", self.task.name, split)
        columns = [dataset[c] for c in self.task.text_columns]
        return [(tuple(texts), label) for *texts, label in zip(*columns, dataset["label"], strict=True)]

    def setup(self, stage: str | None = None) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            check_vocabulary(self.tokenizer, trainer.lightning_module)
        splits = list(self.validation_names) + (["train"] if stage in (None, "fit") else [])
        for split in splits:
            if split not in self.datasets:
                self.datasets[split] = self.encode(self.read_split(split))

    def encode(self, examples: Sequence[Example]) -> list[dict[str, Any]]:
        columns = list(zip(*(texts for texts, _ in examples), strict=True))
        encoded = self.tokenizer(*columns, truncation=True, max_length=self.max_length, verbose=False)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        return [
            {**{k: encoded[k][i] for k in keys}, "labels": label} for i, (_, label) in enumerate(examples)
        ]

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pads to the longest row of the batch, not to max_length."""
        length = max(len(row["input_ids"]) for row in rows)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        token_type_ids = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
            attention_mask[i, :n] = 1
            if "token_type_ids" in row:
                token_type_ids[i, :n] = torch.tensor(row["token_type_ids"], dtype=torch.long)
        dtype = torch.float32 if self.is_regression else torch.long
        labels = torch.tensor([row["labels"] for row in rows], dtype=dtype)
        return {
            "input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
            "labels": labels,
        }  # fmt: skip

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup("fit" if split == "train" else "validate")
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.datasets[split],  # type: ignore[arg-type]
            batch_size=self.batch_size if shuffle else self.eval_batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            pin_memory=pin_memory_default(getattr(self, "trainer", None)),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = [self._loader(split, shuffle=False) for split in self.validation_names]
        return loaders if len(loaders) > 1 else loaders[0]
