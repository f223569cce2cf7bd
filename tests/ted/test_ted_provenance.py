"""Stage-I filters remember the models whose layers they read: stage II with another teacher of the same shape
(another fine-tuning, say) is refused when it is set up, naming both teachers, instead of training on them."""

from __future__ import annotations

import pytest
from ted_helpers import LabelledBatches, quiet_trainer, tiny_classifier

from lightning_kd import DistillationModule
from lightning_kd.ted.callback import TEDFilterCallback
from lightning_kd.training.provenance import ArtifactMismatch


def module(teacher_seed: int) -> DistillationModule:
    teacher = tiny_classifier(layers=2, hidden=16, num_labels=3, seed=teacher_seed)
    student = tiny_classifier(layers=1, hidden=8, num_labels=3, seed=1)
    return DistillationModule(teacher, student, objective=[{"term": "task"}], task="sequence-classification")


def test_stage_two_with_another_teacher_is_refused_and_with_the_same_one_runs(tmp_path) -> None:
    stage_one = TEDFilterCallback(stage="filters", interval=2, save_dir=str(tmp_path))
    quiet_trainer(max_steps=1, callbacks=[stage_one]).fit(module(0), LabelledBatches())
    distill = TEDFilterCallback(stage="distill", filters=str(tmp_path), interval=2)
    with pytest.raises(
        ArtifactMismatch,
        match=r"TED filters of the teacher at .*teacher\.pt: made with .*but this run "
        r"has .*Run stage I \(stage: teacher\) with this run's teacher",
    ):
        quiet_trainer(max_steps=1, callbacks=[distill]).fit(module(5), LabelledBatches())
    distill = TEDFilterCallback(stage="distill", filters=str(tmp_path), interval=2)
    quiet_trainer(max_steps=1, callbacks=[distill]).fit(module(0), LabelledBatches())
