"""TED and HomoDistil in one run: filters on a student that is being pruned, then physically narrowed."""

from __future__ import annotations

import torch
from ted_helpers import LabelledBatches, labelled_batch, quiet_trainer, tiny_classifier

from lightning_kd import DistillationModule
from lightning_kd.pruning.callback import PruningCallback
from lightning_kd.ted.callback import TEDFilterCallback


def _module() -> DistillationModule:
    objective = [{"term": "task"}, {"term": "logits", "temperature": 2.0}]
    return DistillationModule(
        tiny_classifier("bert", layers=4, hidden=16),
        {"init": "copy"},
        objective=objective,
        task="sequence-classification",
        learning_rate=1e-2,
    )


def test_ted_filters_follow_a_student_being_pruned(tmp_path) -> None:
    stage_one = TEDFilterCallback(stage="filters", interval=2, save_dir=str(tmp_path))
    quiet_trainer(max_steps=2, callbacks=[stage_one]).fit(_module(), LabelledBatches())

    module = _module()
    ted = TEDFilterCallback(stage="distill", filters=str(tmp_path), interval=2, weight=2.0)
    pruning = PruningCallback(
        target={"hidden": 0.5, "heads": 0.5, "ffn": 0.5}, start_step=0, end_step=4, interval=1
    )
    quiet_trainer(max_steps=6, callbacks=[ted, pruning]).fit(module, LabelledBatches())

    term = module.objective.terms["ted"]
    assert module.student.config.hidden_size == 8  # physically pruned
    assert term.student_filters.in_width == 8 and term.teacher_filters.in_width == 16
    batch = labelled_batch(3)
    with torch.no_grad():
        _, values = module.objective(module.teacher_features(batch), module.student_features(batch), batch)
    assert values["ted"].isfinite() and values["ted"] > 0
