"""The nine GLUE tasks (and the AX diagnostic set) as data: columns, labels, metrics, and how a submission
line is written. The files and the DataModule that read them are in ``glue.py``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_kd.datamodules.docstrings import DOCSTRING_CLASSES


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
    # GLUE's unlabeled test sets: TSV files (with a header and an ``index`` column), hub splits, and the names
    # of the files the GLUE server takes for them
    test_files: tuple[str, ...] = ("test.tsv",)
    test_splits: tuple[str, ...] = ("test",)
    submission_names: tuple[str, ...] = ()
    test_tsv_columns: tuple[str, ...] = ()  # when the test file names its text columns differently
    class_names: tuple[str, ...] = ()  # readable names (the hub's) where GLUE's files say 0/1

    @property
    def test_columns(self) -> tuple[str, ...]:
        return self.test_tsv_columns or tuple(str(c) for c in self.tsv_columns)

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1

    @property
    def is_regression(self) -> bool:
        return not self.labels


TASKS: dict[str, GLUETask] = {
    task.name: task
    for task in [
        GLUETask(
            "cola",
            "CoLA",
            ("sentence",),
            (3,),
            1,
            ("0", "1"),
            ("matthews_correlation",),
            has_header=False,
            class_names=("unacceptable", "acceptable"),
            submission_names=("CoLA",),
            test_tsv_columns=("sentence",),
        ),
        GLUETask(
            "sst2",
            "SST-2",
            ("sentence",),
            ("sentence",),
            "label",
            ("0", "1"),
            ("accuracy",),
            class_names=("negative", "positive"),
            submission_names=("SST-2",),
        ),
        GLUETask(
            "mrpc",
            "MRPC",
            ("sentence1", "sentence2"),
            ("#1 String", "#2 String"),
            "Quality",
            ("0", "1"),
            ("f1", "accuracy"),
            class_names=("not_equivalent", "equivalent"),
            submission_names=("MRPC",),
        ),
        GLUETask(
            "qqp",
            "QQP",
            ("question1", "question2"),
            ("question1", "question2"),
            "is_duplicate",
            ("0", "1"),
            ("f1", "accuracy"),
            class_names=("not_duplicate", "duplicate"),
            submission_names=("QQP",),
        ),
        GLUETask(
            "stsb",
            "STS-B",
            ("sentence1", "sentence2"),
            ("sentence1", "sentence2"),
            "score",
            (),
            ("pearson", "spearman"),
            submission_names=("STS-B",),
        ),
        GLUETask(
            "mnli",
            "MNLI",
            ("premise", "hypothesis"),
            ("sentence1", "sentence2"),
            "gold_label",
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            validation_files=("dev_matched.tsv", "dev_mismatched.tsv"),
            validation_splits=("validation_matched", "validation_mismatched"),
            test_files=("test_matched.tsv", "test_mismatched.tsv"),
            test_splits=("test_matched", "test_mismatched"),
            submission_names=("MNLI-m", "MNLI-mm"),
        ),
        GLUETask(
            "qnli",
            "QNLI",
            ("question", "sentence"),
            ("question", "sentence"),
            "label",
            ("entailment", "not_entailment"),
            ("accuracy",),
            submission_names=("QNLI",),
        ),
        GLUETask(
            "rte",
            "RTE",
            ("sentence1", "sentence2"),
            ("sentence1", "sentence2"),
            "label",
            ("entailment", "not_entailment"),
            ("accuracy",),
            submission_names=("RTE",),
        ),
        GLUETask(
            "wnli",
            "WNLI",
            ("sentence1", "sentence2"),
            ("sentence1", "sentence2"),
            "label",
            ("0", "1"),
            ("accuracy",),
            class_names=("not_entailment", "entailment"),
            submission_names=("WNLI",),
        ),
        # Not GLUE: an offline stand-in with the same shape (see docstrings.write_docstring_task).
        GLUETask(
            "docstrings",
            "docstrings",
            ("sentence",),
            ("sentence",),
            "label",
            DOCSTRING_CLASSES,
            ("accuracy",),
            submission_names=("docstrings",),
        ),
    ]
}


def submission_lines(task: GLUETask, indices: torch.Tensor, outputs: torch.Tensor) -> list[str]:
    """``index<TAB>prediction`` lines, header first, sorted by index, as GLUE's server reads them.

    Classes are written as the task's own labels (``entailment``, ``not_entailment`` for MNLI, AX, QNLI and RTE;
    ``0``/``1`` elsewhere); STS-B scores are clipped to GLUE's 0-5 range.
    """
    order = torch.argsort(indices)
    indices, outputs = indices[order], outputs[order].float()
    if task.is_regression:
        values = [f"{v:.3f}" for v in outputs.reshape(-1).clamp(0.0, 5.0).tolist()]
    else:
        values = [task.labels[i] for i in outputs.argmax(dim=-1).tolist()]
    return ["index\tprediction"] + [f"{i}\t{v}" for i, v in zip(indices.tolist(), values, strict=True)]


def get_task(name: str) -> GLUETask:
    """A GLUE task by any common spelling (``SST-2``, ``sst2``, ``STS-B``), or an error listing them all."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[key]
