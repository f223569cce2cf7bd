"""The nine GLUE tasks, from the hub (``nyu-mll/glue``) or from GLUE's original TSV files.

The TSV reader splits on tabs and nothing else: MRPC's sentences hold unbalanced double quotes that a CSV
reader would join across lines, CoLA's files have no header, and MNLI's have a dozen columns of parses
before the two sentences, so columns are found by name where a header exists.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_kd.datamodules.common import check_vocabulary, distributed_position, get_tokenizer, rows_loader
from lightning_kd.datamodules.docstrings import write_docstring_task
from lightning_kd.datamodules.glue_tasks import TASKS, GLUETask, get_task, submission_lines  # noqa: F401  (public here too)
from lightning_kd.datamodules.sources import DataSourceError, load_hub_dataset, read_text

# The diagnostic set: MNLI-shaped pairs that a model trained on MNLI labels; GLUE's server takes AX.tsv.
AX_SPLIT = "ax"
AX_HUB_COLUMNS = ("premise", "hypothesis")
AX_FILES = ("diagnostic/diagnostic.tsv", "diagnostic.tsv", "AX/diagnostic.tsv", "AX.tsv")


Example = tuple[tuple[str, ...], float | int]


def read_tsv(path: str | os.PathLike, task: GLUETask, skip_malformed: bool = False) -> list[Example]:
    """(texts, label) rows of a GLUE TSV file; a bad row is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataSourceError(
            f"{path}: no such file; a {task.folder} folder from the GLUE download holds "
            f"train.tsv and {', '.join(task.validation_files)}"
        )
    lines = read_text(path).split("\n")  # a byte-order mark and CRLF line ends as spreadsheets write them
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


def read_test_tsv(path: str | os.PathLike, columns: Sequence[str]) -> list[Example]:
    """(texts, index) rows of an unlabeled GLUE test file: a header with ``index`` (QQP: ``id``) and ``columns``."""
    path = Path(path)
    if not path.is_file():
        raise DataSourceError(
            f"{path}: no such file; GLUE's download holds the unlabeled test sets as test.tsv "
            "(MNLI: test_matched.tsv, test_mismatched.tsv; AX: diagnostic/diagnostic.tsv)"
        )
    lines = read_text(path).split("\n")
    header = lines[0].split("\t") if lines else []
    index_column = next((c for c in ("index", "id") if c in header), None)
    missing = [c for c in columns if c not in header]
    if index_column is None or missing:
        raise DataSourceError(
            f"{path}, line 1: the header {header} lacks {missing or ['index']}; a GLUE test file has an `index` "
            f"column and the text columns {list(columns)}"
        )
    text_at, index_at = [header.index(c) for c in columns], header.index(index_column)
    examples: list[Example] = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < len(header):
            raise DataSourceError(
                f"{path}, line {number}: expected {len(header)} tab-separated columns, found {len(fields)}"
            )
        try:
            index = int(fields[index_at])
        except ValueError:
            raise DataSourceError(
                f"{path}, line {number}: the index {fields[index_at]!r} is not a number"
            ) from None
        examples.append(([fields[i] for i in text_at], index))
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
        with_ax: with MNLI, ``predict`` also labels the AX diagnostic set (GLUE's ``diagnostic/diagnostic.tsv``
            next to the MNLI folder, or the hub's ``ax`` config).

    ``validate`` and ``test`` report the official metrics on the labeled dev sets (GLUE keeps its test labels
    private); ``predict`` labels the unlabeled test sets, and :class:`~lightning_kd.GLUESubmissionWriter` writes
    the predictions as the folder GLUE's server takes.
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
        with_ax: bool = True,
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
        self.with_ax = with_ax
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
    def predict_names(self) -> list[str]:
        """The unlabeled test sets ``predict`` runs on: the task's, plus the AX diagnostic set with MNLI."""
        return list(self.task.test_splits) + ([AX_SPLIT] if self.task.name == "mnli" and self.with_ax else [])

    @property
    def submission_names(self) -> list[str]:
        """The GLUE submission file (without ``.tsv``) of each of ``predict_names``."""
        return list(self.task.submission_names) + (["AX"] if AX_SPLIT in self.predict_names else [])

    @property
    def label_names(self) -> list[str]:
        """Readable class names in label id order, for a model's ``id2label`` (the hub's: ``negative``,
        ``positive`` for SST-2; ``entailment``... for MNLI); [] for STS-B. GLUE's submission files use the
        task's own spelling (``task.labels``: ``0``/``1`` where GLUE's files have numbers)."""
        return list(self.task.class_names or self.task.labels)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = get_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def _folder(self) -> Path:
        return write_docstring_task() if self.data_dir is None else task_folder(self.data_dir, self.task)

    def _ax_file(self) -> Path:
        assert self.data_dir is not None
        folder = task_folder(self.data_dir, self.task)
        candidates = [
            base / name for base in (Path(self.data_dir), folder.parent, folder) for name in AX_FILES
        ]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise DataSourceError(
            f"no AX diagnostic file for MNLI near {self.data_dir}: looked for {', '.join(AX_FILES)} in "
            f"{sorted({str(c.parent) for c in candidates})}. Put GLUE's diagnostic/diagnostic.tsv next to the MNLI "
            "folder, or pass with_ax=False to predict MNLI's test sets alone"
        )

    def read_predict_split(self, split: str) -> list[Example]:
        """Unlabeled (texts, index) examples of one of ``predict_names``."""
        if split not in self.predict_names:
            raise ValueError(
                f"unknown test set {split!r} for {self.task.name}: use one of {self.predict_names}"
            )
        if self.data_dir is not None or self.task.name == "docstrings":
            if split == AX_SPLIT:
                return read_test_tsv(self._ax_file(), ("sentence1", "sentence2"))
            file = self.task.test_files[self.task.test_splits.index(split)]
            return read_test_tsv(self._folder() / file, self.task.test_columns)
        if split == AX_SPLIT:
            dataset, text_columns = load_hub_dataset("nyu-mll/glue", "ax", "test"), AX_HUB_COLUMNS
        else:
            dataset, text_columns = (
                load_hub_dataset("nyu-mll/glue", self.task.name, split),
                self.task.text_columns,
            )
        columns = [dataset[c] for c in text_columns]
        return [(tuple(texts), int(index)) for *texts, index in zip(*columns, dataset["idx"], strict=True)]

    def read_split(self, split: str) -> list[Example]:
        """Raw (texts, label) examples of ``train`` or one of ``validation_names``."""
        if self.data_dir is not None or self.task.name == "docstrings":
            folder = self._folder()
            file = (
                "train.tsv"
                if split == "train"
                else self.task.validation_files[self.validation_names.index(split)]
            )
            return read_tsv(folder / file, self.task, self.skip_malformed)
        dataset = load_hub_dataset("nyu-mll/glue", self.task.name, split)
        columns = [dataset[c] for c in self.task.text_columns]
        return [(tuple(texts), label) for *texts, label in zip(*columns, dataset["label"], strict=True)]

    @override
    def setup(self, stage: str | None = None) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            check_vocabulary(self.tokenizer, trainer.lightning_module)
        if stage == "predict":
            for split in self.predict_names:
                if split not in self.datasets:
                    self.datasets[split] = self.encode(self.read_predict_split(split), key="idx")
            return
        splits = list(self.validation_names) + (["train"] if stage in (None, "fit") else [])
        for split in splits:
            if split not in self.datasets:
                self.datasets[split] = self.encode(self.read_split(split))

    def encode(self, examples: Sequence[Example], key: str = "labels") -> list[dict[str, Any]]:
        """Token ids of each example, with its label (``key="labels"``) or its test-set index (``"idx"``)."""
        columns = list(zip(*(texts for texts, _ in examples), strict=True))
        encoded = self.tokenizer(*columns, truncation=True, max_length=self.max_length, verbose=False)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        return [{**{k: encoded[k][i] for k in keys}, key: value} for i, (_, value) in enumerate(examples)]

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
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        if "labels" in rows[0]:
            dtype = torch.float32 if self.is_regression else torch.long
            batch["labels"] = torch.tensor([row["labels"] for row in rows], dtype=dtype)
        if "idx" in rows[0]:
            batch["idx"] = torch.tensor([row["idx"] for row in rows], dtype=torch.long)
        return batch

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            stage = "fit" if split == "train" else "predict" if split in self.predict_names else "validate"
            self.setup(stage)
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
    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = [self._loader(split, shuffle=False) for split in self.validation_names]
        return loaders if len(loaders) > 1 else loaders[0]

    @override
    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        """The labeled dev sets: GLUE's test labels are private, so ``test`` scores what can be scored."""
        return self.val_dataloader()

    @override
    def predict_dataloader(self) -> DataLoader | list[DataLoader]:
        loaders = [self._loader(split, shuffle=False) for split in self.predict_names]
        # Lightning's predict sampler gives every rank a share without repeats and fails on an empty one with
        # a bare AssertionError; say which set is too small instead
        _, world = distributed_position(getattr(self, "trainer", None))
        for split, loader in zip(self.predict_names, loaders, strict=True):
            if len(loader.dataset) < world:
                raise ValueError(
                    f"the {split} test set has {len(loader.dataset)} rows, fewer than the {world} processes that "
                    f"would share it: predict on at most {len(loader.dataset)} devices."
                )
        return loaders if len(loaders) > 1 else loaders[0]
