"""TeacherComparison: the teacher's task metrics, computed once per set of evaluation batches, and the gap."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_kd.datamodules.glue_tasks import get_task
from lightning_kd.distillation.evaluation import TeacherComparison, evaluation_key

SST2 = SimpleNamespace(task=get_task("sst2"))


def logits_for(right: list[bool]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    labels = torch.zeros(len(right), dtype=torch.long)
    logits = torch.tensor([[1.0, 0.0] if ok else [0.0, 1.0] for ok in right])
    return logits, {"labels": labels}


def test_the_teacher_is_measured_once_per_key_and_the_gap_is_teacher_minus_student() -> None:
    comparison = TeacherComparison()
    comparison.add_task(SST2, "cpu")
    comparison.start(("val", (), (1,)))
    comparison.update("val", *logits_for([True, True, True, False]), 0)
    logged = comparison.end("val", {"val/sst2/accuracy": 0.5})
    # the teacher's every metric is logged; a gap only where the student has the same metric
    assert logged == {
        "val/teacher/sst2/accuracy": 0.75,
        "val/teacher/sst2/score": 0.75,
        "val/gap/sst2/accuracy": 0.25,
    }
    assert comparison.last["student"] == {"val/sst2/accuracy": 0.5}

    # the same sets again: nothing is measured, the cached value is reused
    comparison.start(("val", (), (1,)))
    comparison.update("val", *logits_for([False] * 4), 0)
    assert comparison.end("val", {"val/sst2/accuracy": 0.25}) == {
        "val/teacher/sst2/accuracy": 0.75,
        "val/teacher/sst2/score": 0.75,
        "val/gap/sst2/accuracy": 0.5,
    }
    # other sets (here, another batch count): measured anew
    comparison.start(("val", (), (2,)))
    comparison.update("val", *logits_for([False] * 4), 0)
    assert comparison.end("val", {"val/sst2/accuracy": 0.25})["val/teacher/sst2/accuracy"] == 0.0
    assert set(comparison.results) == {("val", (), (1,)), ("val", (), (2,))}
    (line,) = comparison.summary()
    assert "sst2/accuracy" in line and "student 0.2500" in line and "gap -0.2500 (val)" in line
    assert comparison.card_metrics() == {
        "val/sst2/accuracy": 0.25,
        "val/teacher/sst2/accuracy": 0.0,
        "val/teacher/sst2/score": 0.0,
        "val/gap/sst2/accuracy": -0.25,
    }


def test_without_a_task_nothing_is_compared() -> None:
    comparison = TeacherComparison()
    assert comparison.summary() == [] and comparison.card_metrics() == {}


def test_its_metrics_move_with_the_module_that_owns_it() -> None:
    owner = nn.Module()
    owner.comparison = TeacherComparison()
    owner.comparison.add_task(SST2, "cpu")
    # registered below the owner, so the owner's .to(device) reaches them
    modules = list(owner.modules())
    assert all(any(m is metrics for m in modules) for metrics in owner.comparison.metrics.values())


@pytest.mark.parametrize("sanity", [True, False])
def test_evaluation_key_names_the_stage_the_sets_and_their_batch_counts(sanity: bool) -> None:
    trainer = SimpleNamespace(
        sanity_checking=sanity,
        num_sanity_val_batches=[2, 2],
        num_val_batches=[5, 6],
        num_test_batches=[7],
        datamodule=SimpleNamespace(validation_names=["matched", "mismatched"]),
    )
    expected = (
        ("sanity", ("matched", "mismatched"), (2, 2))
        if sanity
        else ("val", ("matched", "mismatched"), (5, 6))
    )
    assert evaluation_key(trainer, "val") == expected
