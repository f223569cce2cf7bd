"""The frozen teacher as the bar a distilled student is measured against: its task metrics on the evaluation
sets, computed once per set, and the student's gap to them."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_kd.batch import IGNORE_INDEX
from lightning_kd.datamodules.causal import Perplexity
from lightning_kd.datamodules.common import task_metrics
from lightning_kd.objective.generative import chunked_cross_entropy, next_token_targets
from lightning_kd.objective.term import Features

STAGES = ("val", "test")


def evaluation_key(trainer: Any, stage: str) -> tuple:
    """The evaluation sets as the loop will read them: the stage, which sets, and how many batches of each."""
    datamodule = getattr(trainer, "datamodule", None)
    if trainer.sanity_checking:
        stage, counts = "sanity", trainer.num_sanity_val_batches
    else:
        counts = trainer.num_val_batches if stage == "val" else trainer.num_test_batches
    return (stage, tuple(getattr(datamodule, "validation_names", ())), tuple(counts))


class TeacherComparison(nn.Module):
    """The teacher's task metrics (logged as ``<stage>/teacher/...``) and the gap, teacher minus student
    (``<stage>/gap/...``), for each evaluation.

    The teacher is frozen, so its metrics on the same evaluation sets never change: they are computed at the
    first evaluation of a set (see :func:`evaluation_key`) and reused at every later one. An ``nn.Module``, so
    that its metrics move to the device with the module that owns it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.metrics = nn.ModuleDict()
        self.results: dict[tuple, dict[str, float]] = {}  # per evaluation key: the teacher's metrics
        self.last: dict[str, dict[str, float]] = {}  # "student", "teacher", "gap" of the last evaluation
        self._key: tuple = ()
        self._known = False

    def add_task(self, datamodule: Any, device: torch.device | str) -> None:
        """Measure the teacher with the metrics of the DataModule's task (GLUE's, SQuAD's)."""
        for stage in STAGES:
            self.metrics[stage] = task_metrics(datamodule, prefix=f"{stage}/teacher").to(device)

    def start(self, key: tuple) -> None:
        """An evaluation of the sets ``key`` names begins."""
        self._key = key
        self._known = key in self.results

    def update(self, stage: str, logits: Tensor, batch: Any, dataloader_idx: int) -> None:
        if not self._known:
            metrics = self.metrics[stage]
            metrics.update(logits, batch[metrics.target_key], dataloader_idx)

    def end(self, stage: str, student: dict[str, float]) -> dict[str, float]:
        """The teacher's metrics and the gap for the evaluation that ends, given the student's."""
        if not self._known:
            self.results[self._key] = self.metrics[stage].compute()
            self.metrics[stage].reset()
        teacher = self.results.get(self._key, {})
        gap = {
            key.replace(f"{stage}/teacher/", f"{stage}/gap/", 1): value
            - student[key.replace("/teacher", "", 1)]
            for key, value in teacher.items()
            # a gap between two chosen thresholds (SQuAD 2.0's best null threshold) is no gap in quality
            if key.replace("/teacher", "", 1) in student and not key.endswith("_thresh")
        }
        self.last = {"student": student, "teacher": teacher, "gap": gap}
        return {**teacher, **gap}

    def summary(self) -> list[str]:
        """Lines naming the student's and the teacher's task metrics from the last evaluation, and the gap."""
        last = self.last
        lines = []
        for key, value in sorted(last.get("teacher", {}).items()):
            stage = key.split("/", 1)[0]
            plain = key.replace("/teacher", "", 1)
            if plain in last["student"] and not key.endswith("_thresh"):
                lines.append(
                    f"  {plain.split('/', 1)[1]:38s} student {last['student'][plain]:.4f}   "
                    f"teacher {value:.4f}   gap {value - last['student'][plain]:+.4f} ({stage})"
                )
        return lines

    def card_metrics(self) -> dict[str, float]:
        """The last evaluation's student, teacher and gap metrics, in one mapping (the model card's)."""
        last = self.last
        return {**last.get("student", {}), **last.get("teacher", {}), **last.get("gap", {})}


class PerplexityGap(nn.Module):
    """Next-token perplexity of a causal-LM student and of its teacher on an evaluation set, and the gap
    (``<stage>/perplexity/{student,teacher,gap}``, gap = student - teacher), from the final hidden states a chunk
    of positions at a time."""

    def __init__(self, chunk_size: int = 1024) -> None:
        super().__init__()
        self.chunk_size = chunk_size
        self.teacher, self.student = Perplexity(), Perplexity()

    @property
    def update_called(self) -> bool:
        return self.student.update_called

    def update(self, teacher: Features, student: Features, labels: Tensor) -> None:
        targets = next_token_targets(labels, student.positions)
        tokens = (targets != IGNORE_INDEX).sum()
        with torch.no_grad():
            for metric, side in ((self.teacher, teacher), (self.student, student)):
                nll = chunked_cross_entropy(
                    side.head_input, side.head, targets, self.chunk_size, reduction="sum"
                )
                metric.update(nll, tokens)

    def compute(self) -> dict[str, Tensor]:
        student, teacher = self.student.compute(), self.teacher.compute()
        return {"student": student.float(), "teacher": teacher.float(), "gap": (student - teacher).float()}

    def reset(self) -> None:
        self.teacher.reset()
        self.student.reset()
