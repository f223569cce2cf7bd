"""TED's two stages through Lightning: what each trains, what it saves, and resuming."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from kd_helpers import StopAt
from ted_helpers import LabelledBatches, changed, labelled_batch, quiet_trainer, snapshot, tiny_classifier

from lightning_kd import DistillationModule
from lightning_kd.ted.callback import TEDFilterCallback
from lightning_kd.ted.filters import load_filters


def _module(num_labels: int = 3, arch: str = "bert") -> DistillationModule:
    # a constant schedule: a run cut after one epoch then resumed must see the learning rates of a straight run
    teacher = tiny_classifier(arch, layers=4, hidden=16, num_labels=num_labels)
    student = tiny_classifier(arch, layers=2, hidden=8, num_labels=num_labels, seed=1).train()
    prediction = {"loss": "mse"} if num_labels == 1 else {"temperature": 2.0}  # a one-output KL is refused
    objective = [
        {"term": "task"},
        {"term": "logits", "weight": 5.0, **prediction},
        {"term": "hidden", "layers": [[1, 2]], "weight": 1.0},
    ]
    return DistillationModule(
        teacher,
        student,
        objective=objective,
        task="sequence-classification",
        learning_rate=1e-2,
        schedule="constant",
    )


def _stage_one(tmp_path, num_labels: int = 3, steps: int = 4) -> DistillationModule:
    module = _module(num_labels)
    teacher, student = snapshot(module.teacher), snapshot(module.student)
    callback = TEDFilterCallback(stage="filters", interval=2, save_dir=str(tmp_path / "filters"))
    quiet_trainer(max_steps=steps, callbacks=[callback]).fit(module, LabelledBatches(num_labels))
    assert not changed(teacher, module.teacher) and not changed(student, module.student)
    return module


def test_stage_one_trains_only_the_filters_and_their_heads(tmp_path) -> None:
    module = _module()
    callback = TEDFilterCallback(stage="filters", interval=2, save_dir=str(tmp_path / "filters"))
    trainer = quiet_trainer(max_steps=4, callbacks=[callback])
    callback.setup(trainer, module, "fit")  # adds the filters now, so the snapshot holds them; fit keeps them
    before = snapshot(module)
    trainer.fit(module, LabelledBatches())
    moved = changed(before, module)
    assert moved and all(
        name.startswith(("objective.terms.ted_task_teacher.", "objective.terms.ted_task_student."))
        for name in moved
    ), moved
    assert {n.split(".")[2] for n in moved} == {"ted_task_teacher", "ted_task_student"}
    assert any(".heads." in n for n in moved) and any(".filters." in n for n in moved)
    # saved, loadable, and equal to what trained
    for side in ("teacher", "student"):
        loaded = load_filters(tmp_path / "filters" / f"{side}.pt")
        trained = module.objective.terms[f"ted_task_{side}"].filters
        assert loaded.describe() == trained.describe()
        for a, b in zip(loaded.state_dict().values(), trained.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    assert loaded.layers == [1, 2] and loaded.in_width == 8 and loaded.out_width == 16


def _stage_two(
    tmp_path, num_labels: int = 3, **trainer_kwargs
) -> tuple[DistillationModule, TEDFilterCallback]:
    module = _module(num_labels)
    callback = TEDFilterCallback(stage="distill", filters=str(tmp_path / "filters"), interval=2, weight=3.0)
    quiet_trainer(callbacks=[callback], **trainer_kwargs).fit(module, LabelledBatches(num_labels))
    return module, callback


def test_stage_two_never_changes_the_teacher_or_its_filters(tmp_path) -> None:
    _stage_one(tmp_path)
    teacher_filters = load_filters(tmp_path / "filters" / "teacher.pt")
    student_filters = load_filters(tmp_path / "filters" / "student.pt")
    module = _module()
    teacher = snapshot(module.teacher)
    callback = TEDFilterCallback(stage="distill", filters=str(tmp_path / "filters"), interval=2, weight=3.0)
    trainer = quiet_trainer(max_steps=4, callbacks=[callback])
    trainer.fit(module, LabelledBatches())
    term = module.objective.terms["ted"]
    assert term.weight == 3.0 and bool(term.from_stage_one)
    assert not changed(teacher, module.teacher)
    assert not changed(snapshot(teacher_filters), term.teacher_filters)
    assert changed(snapshot(student_filters), term.student_filters)  # the student's filters train
    assert not any(p.requires_grad for p in term.teacher_filters.parameters())
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not any(id(p) in optimised for p in term.teacher_filters.parameters())
    assert all(id(p) in optimised for p in term.student_filters.parameters())
    batch = labelled_batch(3)
    value = term(module.teacher_features(batch), module.student_features(batch), batch)
    assert value > 0 and value.requires_grad


def test_regression_task_runs_both_stages_with_a_nonzero_prediction_term(tmp_path) -> None:
    module = _stage_one(tmp_path, num_labels=1, steps=2)
    assert module.objective.terms["ted_task_teacher"].heads[0].classifier.out_features == 1
    module, _ = _stage_two(tmp_path, num_labels=1, max_steps=2)
    batch = labelled_batch(1)
    _, values = module.objective(module.teacher_features(batch), module.student_features(batch), batch)
    assert values["logits_mse"] > 0 and values["ted"] > 0


def test_filter_state_survives_checkpoint_and_resume(tmp_path) -> None:
    _stage_one(tmp_path, steps=2)

    def stage_two(*callbacks: L.Callback, ckpt_path: Path | None = None) -> DistillationModule:
        module = _module()
        ted = TEDFilterCallback(stage="distill", filters=str(tmp_path / "filters"), interval=2, weight=3.0)
        trainer = quiet_trainer(max_steps=6, callbacks=[ted, *callbacks])
        trainer.fit(module, LabelledBatches(num_batches=3), ckpt_path=ckpt_path)
        if callbacks:
            trainer.save_checkpoint(tmp_path / "half.ckpt")
        return module

    straight = stage_two()
    stage_two(StopAt(4))  # one batch into the second epoch of three
    saved = torch.load(tmp_path / "half.ckpt", weights_only=False)
    assert any(k.startswith("objective.terms.ted.teacher_filters") for k in saved["state_dict"])
    assert saved["callbacks"]["TEDFilterCallback[stage=distill]"]["interval"] == 2

    # the stage-I files are gone: the checkpoint alone carries the filters
    for path in (tmp_path / "filters").iterdir():
        path.unlink()
    resumed = stage_two(ckpt_path=tmp_path / "half.ckpt")
    term, reference = resumed.objective.terms["ted"], straight.objective.terms["ted"]
    assert bool(term.from_stage_one)
    for (name, a), b in zip(term.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for (name, a), b in zip(
        resumed.student.state_dict().items(), straight.student.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("arch", ["deberta-v2"])
def test_deberta_student_distils_through_filters(tmp_path, arch: str) -> None:
    module = _module(arch=arch)
    quiet_trainer(
        max_steps=1, callbacks=[TEDFilterCallback(stage="filters", interval=2, save_dir=str(tmp_path))]
    ).fit(module, LabelledBatches())
    module = _module(arch=arch)
    callback = TEDFilterCallback(stage="distill", filters=str(tmp_path), interval=2)
    quiet_trainer(max_steps=1, callbacks=[callback]).fit(module, LabelledBatches())
    assert bool(module.objective.terms["ted"].from_stage_one)
