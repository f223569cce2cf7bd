"""Stage I one side per run, as the paper recipes do (the authors give each side its own learning rate)."""

from __future__ import annotations

import torch
from ted_helpers import LabelledBatches, changed, quiet_trainer, snapshot, tiny_classifier

from lightning_kd import DistillationModule
from lightning_kd.ted.callback import TEDFilterCallback
from lightning_kd.ted.filters import load_filters


def _module(learning_rate: float) -> DistillationModule:
    teacher = tiny_classifier(layers=4, hidden=16)
    student = tiny_classifier(layers=2, hidden=8, seed=1).train()
    return DistillationModule(
        teacher,
        student,
        objective=[{"term": "task"}],
        task="sequence-classification",
        learning_rate=learning_rate,
        schedule="constant",
    )


def _stage_one_side(side: str, learning_rate: float, folder) -> DistillationModule:
    module = _module(learning_rate)
    callback = TEDFilterCallback(stage=side, interval=2, save_dir=str(folder))
    trainer = quiet_trainer(max_steps=3, callbacks=[callback])
    callback.setup(trainer, module, "fit")
    before = snapshot(module)
    trainer.fit(module, LabelledBatches())
    moved = changed(before, module)
    assert moved and {name.split(".")[2] for name in moved} == {f"ted_task_{side}"}, moved
    assert trainer.optimizers[0].param_groups[0]["lr"] == learning_rate
    return module


def test_each_side_in_its_own_run_then_stage_two_reads_both(tmp_path) -> None:
    folder = tmp_path / "filters"
    teacher_run = _stage_one_side("teacher", 1e-2, folder)
    assert [p.name for p in folder.iterdir()] == ["teacher.pt"]  # a one-side run writes only its side
    student_run = _stage_one_side("student", 3e-2, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["student.pt", "teacher.pt"]
    assert "ted_task_teacher" not in student_run.objective.terms
    module = _module(1e-2)
    callback = TEDFilterCallback(stage="distill", filters=str(folder), interval=2, normalize="authors")
    callback.setup(quiet_trainer(), module, "fit")
    term = module.objective.terms["ted"]
    for side, run in (("teacher", teacher_run), ("student", student_run)):
        trained = run.objective.terms[f"ted_task_{side}"].filters.state_dict()
        loaded = getattr(term, f"{side}_filters").state_dict()
        assert all(torch.equal(trained[k], loaded[k]) for k in trained)
        assert load_filters(folder / f"{side}.pt").describe() == getattr(term, f"{side}_filters").describe()
