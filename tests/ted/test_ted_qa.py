"""TED on extractive question answering (SQuAD): span heads in stage I, QA models in stage II, mixes refused."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from ted_helpers import LabelledBatches, changed, quiet_trainer, snapshot, tiny_classifier
from tiny_models import make_model
from torch.utils.data import DataLoader

from lightning_kd import DistillationModule
from lightning_kd.datamodules.squad_tasks import SquadReference, get_squad_task
from lightning_kd.objective.predictions import span_cross_entropy
from lightning_kd.ted.callback import TEDFilterCallback
from lightning_kd.ted.filters import SpanHead, load_filters, save_filters

SEQ = 12


def span_batch(batch_size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A SQuAD-like batch: question then context (token types 0, 1), padding on every other row, answers as
    start/end token positions, and a window with no answer pointing at CLS (0)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 97, (batch_size, SEQ), generator=generator)
    input_ids[:, 0] = 2  # CLS
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1::2, SEQ - 3 :] = 0
    input_ids[attention_mask == 0] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, 4:] = 1
    starts = torch.randint(5, SEQ - 4, (batch_size,), generator=generator)
    ends = starts + torch.randint(0, 2, (batch_size,), generator=generator)
    starts[0], ends[0] = 0, 0  # unanswerable in this window
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "start_positions": starts,
        "end_positions": ends,
    }


class SpanBatches(L.LightningDataModule):
    """Fixed SQuAD-like batches with the SQuAD v2.0 task, as a SQuADDataModule gives it."""

    def __init__(self, num_batches: int = 2) -> None:
        super().__init__()
        self.task = get_squad_task("squad_v2")
        self.batches = [span_batch(seed=i) for i in range(num_batches)]

    def evaluation_set(self, split: str) -> SquadReference:
        # what the module's SQuAD metrics are built on; no validation runs here
        offsets = torch.full((1, SEQ, 2), -1, dtype=torch.int32)
        return SquadReference(["q0"], ["text"], [[]], torch.tensor([0]), offsets, version_2=True)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None, shuffle=False)


def qa_module() -> DistillationModule:
    teacher = make_model("bert", "qa", num_hidden_layers=4)
    student = make_model(
        "bert", "qa", seed=1, num_hidden_layers=2, hidden_size=16, intermediate_size=32
    ).train()
    return DistillationModule(
        teacher,
        student,
        objective=[{"term": "task"}, {"term": "logits", "temperature": 2.0, "weight": 5.0}],
        task="question-answering",
        learning_rate=1e-2,
        schedule="constant",
    )


def _stage_one(folder) -> DistillationModule:
    module = qa_module()
    callback = TEDFilterCallback(stage="filters", interval=2, save_dir=str(folder))
    quiet_trainer(max_steps=2, callbacks=[callback]).fit(module, SpanBatches())
    return module


def test_stage_one_trains_span_heads_on_the_filters_and_nothing_else(tmp_path) -> None:
    module = qa_module()
    callback = TEDFilterCallback(stage="filters", interval=2, save_dir=str(tmp_path))
    trainer = quiet_trainer(max_steps=8, callbacks=[callback])
    callback.setup(trainer, module, "fit")
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".ted_task_" in name for name in trainable), trainable
    for side in ("teacher", "student"):
        term = module.objective.terms[f"ted_task_{side}"]
        assert term.head == "span" and len(term.heads) == 2
        assert all(isinstance(head, SpanHead) and head.qa_outputs.out_features == 2 for head in term.heads)
    before, teacher = snapshot(module), snapshot(module.teacher)
    batch = span_batch(seed=0)
    features = module.teacher_features(batch), module.student_features(batch)
    with torch.no_grad():
        start = {
            s: float(module.objective.terms[f"ted_task_{s}"](*features, batch))
            for s in ("teacher", "student")
        }
    trainer.fit(module, SpanBatches())
    moved = changed(before, module)
    assert {name.split(".")[2] for name in moved} == {"ted_task_teacher", "ted_task_student"}, moved
    assert any(".heads." in n for n in moved) and any(".filters." in n for n in moved)
    assert not changed(teacher, module.teacher)
    features = module.teacher_features(batch), module.student_features(batch)
    for side in ("teacher", "student"):
        with torch.no_grad():
            end = float(module.objective.terms[f"ted_task_{side}"](*features, batch))
        assert end < start[side] - 0.1, (side, start[side], end)


def test_span_head_scores_each_token_and_the_loss_is_the_span_cross_entropy() -> None:
    torch.manual_seed(0)
    head = SpanHead(6)
    filtered = torch.randn(3, 5, 6)
    scores = head(filtered)
    assert scores.shape == (3, 2, 5)
    weight, bias = head.qa_outputs.weight, head.qa_outputs.bias
    for which in (0, 1):  # start, end
        expected = torch.einsum("btd,d->bt", filtered, weight[which]) + bias[which]
        torch.testing.assert_close(scores[:, which], expected)

    module = qa_module()
    callback = TEDFilterCallback(stage="teacher", interval=2)
    callback.setup(quiet_trainer(), module, "fit")
    term = module.objective.terms["ted_task_teacher"]
    batch = span_batch(seed=3)
    teacher, student = module.teacher_features(batch), module.student_features(batch)
    hidden = teacher.hidden_states
    expected = []
    for layer, f, h in zip((2, 4), term.filters.filters, term.heads, strict=True):
        logits = h(f(hidden[layer]))
        rows = torch.arange(len(batch["input_ids"]))
        start = -logits[:, 0].log_softmax(-1)[rows, batch["start_positions"]]
        end = -logits[:, 1].log_softmax(-1)[rows, batch["end_positions"]]
        expected.append(((start + end) / 2).mean())
        torch.testing.assert_close(span_cross_entropy(logits, batch), expected[-1])
    torch.testing.assert_close(term(teacher, student, batch), torch.stack(expected).mean())


def test_saved_span_filters_load_into_stage_two_on_qa_models(tmp_path) -> None:
    _stage_one(tmp_path / "filters")
    for side in ("teacher", "student"):
        loaded = load_filters(tmp_path / "filters" / f"{side}.pt")
        assert loaded.head == "span"
        saved = torch.load(tmp_path / "filters" / f"{side}.pt", weights_only=True)
        assert saved["head"] == "span" and saved["meta"]["num_labels"] is None
    teacher_filters = load_filters(tmp_path / "filters" / "teacher.pt")

    module = qa_module()
    callback = TEDFilterCallback(stage="distill", filters=str(tmp_path / "filters"), interval=2, weight=3.0)
    trainer = quiet_trainer(max_steps=2, callbacks=[callback])
    trainer.fit(module, SpanBatches())
    term = module.objective.terms["ted"]
    assert bool(term.from_stage_one) and callback.head == "span"
    assert not changed(snapshot(teacher_filters), term.teacher_filters)
    assert callback.state_dict()["head"] == "span"

    batch = span_batch(seed=5)
    module.zero_grad()
    value = term(module.teacher_features(batch), module.student_features(batch), batch)
    assert value.isfinite() and value > 0
    value.backward()
    encoder = [p.grad for n, p in module.student.named_parameters() if ".encoder.layer." in n]
    assert encoder and all(g is not None for g in encoder) and any(g.abs().sum() > 0 for g in encoder)
    assert all(p.grad is None for p in term.teacher_filters.parameters())
    loss, values = module.objective(module.teacher_features(batch), module.student_features(batch), batch)
    assert loss.isfinite() and {"task", "ted"} <= set(values)


def test_stage_one_refuses_a_classifier_teacher_on_squad_data(tmp_path) -> None:
    module = DistillationModule(
        tiny_classifier(layers=4, hidden=16),
        tiny_classifier(layers=2, hidden=8, seed=1),
        objective=[{"term": "task"}],
        task="sequence-classification",
    )
    callback = TEDFilterCallback(stage="filters", interval=2, save_dir=str(tmp_path))
    with pytest.raises(
        ValueError,
        match=r"not one kind throughout.*'squad_v2': question answering.*"
        r"the teacher \(BertForSequenceClassification\): classification.*"
        r"DistillationModule\(task='question-answering'\).*FineTuningModule\(task='squad_v2'\)",
    ):
        quiet_trainer(max_steps=1, callbacks=[callback]).fit(module, SpanBatches())


def test_a_qa_teacher_on_glue_data_and_num_labels_on_qa_are_refused(tmp_path) -> None:
    callback = TEDFilterCallback(stage="filters", interval=2, save_dir=str(tmp_path))
    with pytest.raises(
        ValueError,
        match=r"'mnli': classification.*the teacher \(BertForQuestionAnswering\): "
        r"question answering.*for GLUE, a GLUEDataModule",
    ):
        quiet_trainer(max_steps=1, callbacks=[callback]).fit(qa_module(), LabelledBatches())
    callback = TEDFilterCallback(stage="filters", interval=2, num_labels=2)
    with pytest.raises(ValueError, match="num_labels=2 is for classification.*leave num_labels unset"):
        callback.setup(quiet_trainer(), qa_module(), "fit")


def test_stage_two_and_resume_refuse_filters_of_the_other_task(tmp_path) -> None:
    _stage_one(tmp_path / "span")
    for side in ("teacher", "student"):  # the same shapes, learned (say) on GLUE
        filters = load_filters(tmp_path / "span" / f"{side}.pt")
        filters.head = "classifier"
        save_filters(tmp_path / "glue" / f"{side}.pt", filters)
    callback = TEDFilterCallback(stage="distill", filters=str(tmp_path / "glue"), interval=2)
    with pytest.raises(
        ValueError, match=r"trained with classifier heads.*distils with span heads.*run stage I"
    ):
        callback.setup(quiet_trainer(), qa_module(), "fit")

    callback = TEDFilterCallback(stage="distill", filters=str(tmp_path / "span"), interval=2)
    callback.setup(quiet_trainer(), qa_module(), "fit")
    state = callback.state_dict()
    callback.load_state_dict(state)  # its own state resumes
    with pytest.raises(
        ValueError, match=r"checkpoint's TED run trained classifier heads.*set up for span heads"
    ):
        callback.load_state_dict({**state, "head": None})  # a checkpoint from before QA: classification
