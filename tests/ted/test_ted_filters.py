"""TED filters: where they sit, what they refuse, and how they follow a narrowed student."""

from __future__ import annotations

import pytest
import torch
from ted_helpers import ARCHITECTURES, LabelledBatches, labelled_batch, quiet_trainer, tiny_classifier

from lightning_kd import DistillationModule
from lightning_kd.models.info import model_info
from lightning_kd.ted import FilteredHidden
from lightning_kd.ted.callback import TEDFilterCallback
from lightning_kd.ted.filters import LayerFilters, filter_layer_pairs, save_filters


def _module(
    arch: str = "bert", student_layers: int = 2, student_hidden: int = 8, **kwargs
) -> DistillationModule:
    teacher = tiny_classifier(arch, layers=4, hidden=16)
    student = tiny_classifier(arch, layers=student_layers, hidden=student_hidden, seed=1).train()
    return DistillationModule(
        teacher, student, objective=[{"term": "task"}], task="sequence-classification", **kwargs
    )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_filters_sit_on_every_kth_layer_of_each_architecture(arch: str) -> None:
    module = _module(arch)
    callback = TEDFilterCallback(stage="filters", interval=2)
    callback.setup(quiet_trainer(), module, "fit")
    teacher_term, student_term = (
        module.objective.terms["ted_task_teacher"],
        module.objective.terms["ted_task_student"],
    )
    assert teacher_term.filters.layers == [2, 4] and student_term.filters.layers == [1, 2]
    assert (teacher_term.filters.in_width, teacher_term.filters.out_width) == (16, 16)
    assert (student_term.filters.in_width, student_term.filters.out_width) == (
        8,
        16,
    )  # into the teacher's width
    # the filter reads the block's output: hidden state i is block i (0 = embeddings)
    batch = labelled_batch(3)
    hidden = module.student_features(batch).hidden_states
    filtered = student_term.filters(hidden)
    assert torch.equal(filtered[0], student_term.filters.filters[0](hidden[1]))
    value = teacher_term(module.teacher_features(batch), module.student_features(batch), batch)
    assert value.isfinite() and value.requires_grad


def test_pairs_and_bad_intervals() -> None:
    assert filter_layer_pairs(12, 6, interval=2) == [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10), (6, 12)]
    assert filter_layer_pairs(12, 12, interval=3) == [(3, 3), (6, 6), (9, 9), (12, 12)]
    with pytest.raises(
        ValueError, match=r"interval 5 does not divide the teacher's 12 layers.*\[1, 2, 3, 4, 6, 12\]"
    ):
        filter_layer_pairs(12, 6, interval=5)
    with pytest.raises(ValueError, match="cannot be spread evenly over the student's 3 layers"):
        filter_layer_pairs(4, 3, interval=1)
    with pytest.raises(ValueError, match="teacher gets 2 TED filters .* student 4"):
        filter_layer_pairs(4, 4, interval=2, student_interval=1)
    module = _module(student_layers=3)
    with pytest.raises(ValueError, match="cannot be spread evenly"):
        TEDFilterCallback(stage="filters", interval=1).setup(quiet_trainer(), module, "fit")


def test_stage_two_needs_stage_one_filters(tmp_path) -> None:
    with pytest.raises(ValueError, match="run stage='filters' first"):
        TEDFilterCallback(stage="distill")
    module = _module()
    with pytest.raises(FileNotFoundError, match="no stage-I TED filters for the teacher"):
        callback = TEDFilterCallback(stage="distill", filters=str(tmp_path), interval=2)
        quiet_trainer(max_steps=1, callbacks=[callback]).fit(module, LabelledBatches())
    # declared by hand, the term refuses to match through random filters
    term = FilteredHidden(interval=2)
    term.bind(model_info(module.teacher, "teacher"), model_info(module.student, "student"))
    batch = labelled_batch(3)
    with pytest.raises(RuntimeError, match="no stage-I filters"):
        term(module.teacher_features(batch), module.student_features(batch), batch)
    # filters from another shape of run are refused by name
    save_filters(tmp_path / "teacher.pt", LayerFilters([2, 4], 16, 16))
    save_filters(tmp_path / "student.pt", LayerFilters([1, 2], 8, 32))
    with pytest.raises(ValueError, match="stage-I student filters .* do not fit"):
        TEDFilterCallback(stage="distill", filters=str(tmp_path), interval=2).setup(
            quiet_trainer(), _module(), "fit"
        )


def test_heads_must_fit_the_task() -> None:
    module = _module()  # 3-label teacher and student
    trainer = quiet_trainer(max_steps=1, callbacks=[TEDFilterCallback(stage="filters", interval=2)])
    with pytest.raises(ValueError, match="heads do not fit the task's number of labels .*task: 2"):
        trainer.fit(module, LabelledBatches(num_labels=2, task_labels=2))
    with pytest.raises(ValueError, match="unknown TED stage"):
        TEDFilterCallback(stage="both")


def test_filters_follow_a_narrowed_student() -> None:
    filters = LayerFilters([1, 2], 8, 16, kind="mlp")
    hidden = (torch.zeros(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    kept = torch.tensor([0, 2, 3, 7])
    masked = [h * torch.isin(torch.arange(8), kept) for h in hidden]
    expected = filters(masked)
    filters.narrow_input_width(kept)
    narrowed = filters([h[..., kept] for h in hidden])
    assert filters.in_width == 4
    for a, b in zip(expected, narrowed, strict=True):
        torch.testing.assert_close(a, b)
