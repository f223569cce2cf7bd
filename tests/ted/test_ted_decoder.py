"""TED's two stages on decoder classifiers (a Llama teacher with grouped-query attention, a shallower and
narrower student): the filters' heads read the last real token, the only one a causal decoder lets see the
whole sequence; filters learned, saved, loaded and distilled through, the teacher untouched. Causal LMs, whose
task has no filter head, are refused."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from ted_helpers import changed, quiet_trainer, snapshot
from tiny_models import make_model
from torch.utils.data import DataLoader

from lightning_kd import DistillationModule
from lightning_kd.ted.callback import TEDFilterCallback
from lightning_kd.ted.filters import load_filters

pytestmark = pytest.mark.usefixtures("one_thread")


def decoder_batch(seed: int = 0, batch: int = 4, length: int = 10) -> dict[str, torch.Tensor]:
    """Right-padded with the decoders' pad id 0 (every other row); the label is the last real token's class,
    so only a head that reads that token can learn it."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 97, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::2, -3:] = 0
    input_ids[attention_mask == 0] = 0
    last = attention_mask.sum(-1) - 1
    labels = input_ids[torch.arange(batch), last] % 3
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class DecoderBatches(L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.task = SimpleNamespace(name="mnli", num_labels=3)  # a GLUE task name, so the metrics build
        self.batches = [decoder_batch(seed) for seed in range(2)]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)


def ted_module() -> DistillationModule:
    teacher = make_model("llama", "cls", num_hidden_layers=4)  # 32 wide, 8 query heads in 4 groups
    student = make_model("llama", "cls", seed=1, num_hidden_layers=2, hidden_size=16, num_attention_heads=4)
    return DistillationModule(
        teacher,
        student.train(),
        objective=[{"term": "task"}, {"term": "logits", "weight": 5.0, "temperature": 2.0}],
        task="sequence-classification",
        learning_rate=1e-2,
        schedule="constant",
    )


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_the_stage_one_heads_of_a_decoder_read_its_last_real_token(tmp_path: Path) -> None:
    module = ted_module()
    stage_one = TEDFilterCallback(stage="filters", interval=2, save_dir=str(tmp_path))
    stage_one.setup(quiet_trainer(max_steps=1, callbacks=[stage_one]), module, "fit")
    term = module.objective.terms["ted_task_teacher"]

    def scores(batch: dict) -> torch.Tensor:
        hidden = module.teacher_features(module.prepare_batch(batch)).hidden_states
        with torch.no_grad():
            return term.heads[-1](term.filters(hidden)[-1], batch["attention_mask"])

    batch = decoder_batch()
    later, padding = copy.deepcopy(batch), copy.deepcopy(batch)
    later["input_ids"][:, 6] = (later["input_ids"][:, 6] + 1 - 3) % 94 + 3  # a real token in every row
    padding["input_ids"][::2, -3:] = 5  # what sits under the padding
    assert not torch.allclose(scores(later), scores(batch))  # a first-token head would see no change
    torch.testing.assert_close(scores(padding), scores(batch), rtol=0, atol=1e-6)


def test_ted_learns_a_decoders_filters_then_distils_through_them(tmp_path: Path) -> None:
    module = ted_module()
    stage_one = TEDFilterCallback(stage="filters", interval=2, save_dir=str(tmp_path / "filters"))
    trainer = quiet_trainer(max_steps=3, callbacks=[stage_one])
    stage_one.setup(trainer, module, "fit")  # adds the filters now, so the snapshot holds them
    before = snapshot(module)
    trainer.fit(module, DecoderBatches())
    moved = changed(before, module)
    # only the filters and their heads learn, on both sides; both models stay as they were
    assert {name.split(".")[2] for name in moved} == {"ted_task_teacher", "ted_task_student"}, moved
    assert any(".heads." in name for name in moved) and any(".filters." in name for name in moved)
    for side, layers, width in (("teacher", [2, 4], 32), ("student", [1, 2], 16)):
        saved = load_filters(tmp_path / "filters" / f"{side}.pt")
        assert saved.layers == layers and saved.in_width == width and saved.out_width == 32
        assert saved.head == "classifier" and same(saved, module.objective.terms[f"ted_task_{side}"].filters)

    module = ted_module()
    teacher, student = copy.deepcopy(module.teacher), copy.deepcopy(module.student)
    stage_two = TEDFilterCallback(stage="distill", filters=str(tmp_path / "filters"), interval=2, weight=3.0)
    quiet_trainer(max_steps=3, callbacks=[stage_two]).fit(module, DecoderBatches())
    term = module.objective.terms["ted"]
    assert bool(term.from_stage_one) and term.weight == 3.0
    # the teacher and its stage-I filters stay; the student and its filters learn
    assert same(term.teacher_filters, load_filters(tmp_path / "filters" / "teacher.pt"))
    assert not same(term.student_filters, load_filters(tmp_path / "filters" / "student.pt"))
    assert same(module.teacher, teacher) and not same(module.student, student)
    batch = module.prepare_batch(decoder_batch(seed=5))
    value = term(module.teacher_features(batch), module.student_features(batch), batch)
    assert torch.isfinite(value) and value > 0 and value.requires_grad


def test_ted_refuses_causal_lms_whose_task_has_no_filter_head(tmp_path: Path) -> None:
    module = DistillationModule(make_model("llama"), {"init": "layers", "num_layers": 1}, task="causal-lm")
    callback = TEDFilterCallback(stage="filters", num_labels=3, save_dir=str(tmp_path), interval=3)
    with pytest.raises(
        ValueError, match="teacher and the student are causal LMs.*'tokens' and 'hidden' terms"
    ):
        quiet_trainer(max_steps=1, callbacks=[callback]).fit(
            module, DecoderBatches()
        )  # refused before a batch
