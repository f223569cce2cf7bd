"""What a run writes at its end is checked when it starts, and a save that fails at the end keeps the student."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from kd_helpers import FixedBatches, quiet_trainer
from transformers import AutoModelForMaskedLM, BertForMaskedLM

from lightning_kd import DistillationModule, DistillationReport, FineTuningModule, PruningCallback


class CountSteps(L.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args: object) -> None:
        self.batches += 1


def fit(
    teacher: BertForMaskedLM,
    callback: L.Callback,
    student: dict | None = None,
    steps: int = 4,
    root: Path | None = None,
) -> CountSteps:
    torch.manual_seed(0)
    module = DistillationModule(teacher, student or {"init": "copy"}, objective=[{"term": "hidden"}])
    counter = CountSteps()
    trainer = quiet_trainer(
        max_steps=steps, callbacks=[callback, counter], default_root_dir=str(root) if root else None
    )
    trainer.fit(module, FixedBatches())
    return counter


@pytest.mark.parametrize(
    "make",
    [
        lambda path: DistillationReport(export_dir=str(path)),
        lambda path: PruningCallback({"ffn": 0.5}, interval=2, export_dir=str(path)),
    ],
)
def test_export_dir_that_is_a_file_is_refused_before_the_first_step(
    teacher: BertForMaskedLM, tmp_path: Path, make: object
) -> None:
    existing = tmp_path / "student"
    existing.write_text("not a folder")
    counter = CountSteps()
    with pytest.raises(ValueError, match="cannot export to .*student: it is a file"):
        module = DistillationModule(teacher, {"init": "copy"}, objective=[{"term": "hidden"}])
        quiet_trainer(max_steps=4, callbacks=[make(existing), counter]).fit(module, FixedBatches())
    assert counter.batches == 0


def test_export_dir_below_a_file_or_unwritable_is_refused(teacher: BertForMaskedLM, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, so no folder can be made below it"):
        fit(teacher, DistillationReport(export_dir=str(tmp_path / "file" / "student")))
    # root may write anywhere chmod allows; sysfs refuses new files even to root
    with pytest.raises(ValueError, match="nothing can be written in /sys"):
        fit(teacher, DistillationReport(export_dir="/sys/lightning-kd-test/student"))


def test_finetuning_export_dir_is_checked_when_fit_starts(tmp_path: Path) -> None:
    (tmp_path / "model").write_text("x")
    module = FineTuningModule(torch.nn.Linear(2, 2), task="sst2", export_dir=str(tmp_path / "model"))
    with pytest.raises(ValueError, match="it is a file"):
        module.on_fit_start()


def test_heads_competing_across_layers_that_could_not_be_exported_are_refused_at_start(
    teacher: BertForMaskedLM,
) -> None:
    # 4 heads of size 4 per layer, hidden 16 -> 8: two heads fit per layer, but across layers one may keep all 4
    pruning = PruningCallback({"hidden": 0.5, "heads": 0.5}, interval=2, same_per_layer=False)
    with pytest.raises(
        ValueError, match="same_per_layer=False one layer may keep up to 4 heads.*same_per_layer=True"
    ):
        fit(teacher, pruning)
    fit(teacher, PruningCallback({"hidden": 0.5, "heads": 0.5}, interval=2, same_per_layer=True))


def test_a_save_that_fails_at_the_end_keeps_the_student_and_says_where(
    teacher: BertForMaskedLM, tmp_path: Path
) -> None:
    target = tmp_path / "student"

    class TakeThePath(L.Callback):
        # something else claims the folder's name while the run trains
        def on_train_end(self, *args: object) -> None:
            target.write_text("claimed")

    torch.manual_seed(0)
    module = DistillationModule(teacher, {"init": "copy"}, objective=[{"term": "hidden"}])
    trainer = quiet_trainer(
        max_steps=2,
        default_root_dir=str(tmp_path / "run"),
        callbacks=[DistillationReport(export_dir=str(target)), TakeThePath()],
    )
    with pytest.raises(OSError, match="could not save the student to .*student.*saved to .*student-rescued-"):
        trainer.fit(module, FixedBatches())
    (rescued,) = (tmp_path / "run").glob("student-rescued-*")
    loaded = AutoModelForMaskedLM.from_pretrained(rescued)
    assert torch.equal(
        loaded.bert.embeddings.word_embeddings.weight, module.student.bert.embeddings.word_embeddings.weight
    )
