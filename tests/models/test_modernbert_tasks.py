"""ModernBERT through the task-level parts: GLUE fine-tuning and task-specific distillation (ETD and layer
students, exported and reloaded), SQuAD with ModernBERT's QA head (called ``classifier``, not ``qa_outputs``), and
TED's two stages, each on the offline tokenizer's data with tiny models that run both attention kinds."""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    ModernBertConfig,
    ModernBertForQuestionAnswering,
    ModernBertForSequenceClassification,
)

from lightning_kd import (
    DistillationModule,
    FineTuningModule,
    GLUEDataModule,
    SQuADDataModule,
    answer_questions,
)
from lightning_kd.callbacks.submission import SquadPredictionWriter
from lightning_kd.datamodules.squad_docstrings import write_docstring_squad
from lightning_kd.datamodules.squad_metrics import squad_v1_scores
from lightning_kd.distillation.features import model_features
from lightning_kd.models.layers import is_classifier, is_question_answering
from lightning_kd.objective.term import Needs
from lightning_kd.ted.callback import TEDFilterCallback
from lightning_kd.ted.filters import load_filters

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "datamodules"))
from helpers_data import dev_predictions  # noqa: E402
from kd_datafiles import TOKENIZER, write_glue_task  # noqa: E402  (the GLUE folders the data tests write)

pytestmark = pytest.mark.usefixtures("one_thread")

INPUTS = ("input_ids", "attention_mask")  # ModernBERT has no token types
ETD_STUDENT = {
    "init": "extract",
    "num_layers": 2,
    "hidden_size": 16,
    "num_attention_heads": 2,
    "intermediate_size": 32,
}
GLOBAL, LOCAL = "full_attention", "sliding_attention"


def tiny_modernbert(
    head: str = "cls", layers: int = 4, hidden: int = 32, num_labels: int = 2, seed: int = 0
) -> ModernBertForSequenceClassification | ModernBertForQuestionAnswering:
    """A ModernBERT over the offline tokenizer's vocabulary (MiniLM's WordPiece: pad 0, CLS 101, SEP 102) with
    heads of 8 dimensions. Every third layer from 0 attends globally, the others in a window of 2 tokens each
    side, so both kinds run on sentences of a few dozen tokens; 4 layers: global, local, local, global, and a
    2-layer student taken uniformly (layers 1 and 3) keeps one of each. ``head``: ``cls`` or ``qa``."""
    config = ModernBertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 8,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        local_attention=4,
        pad_token_id=0,
        cls_token_id=101,
        sep_token_id=102,
        bos_token_id=101,
        eos_token_id=102,
        num_labels=2 if head == "qa" else num_labels,
    )
    torch.manual_seed(seed)
    model_class = ModernBertForQuestionAnswering if head == "qa" else ModernBertForSequenceClassification
    return model_class(config).eval()


def quiet_trainer(root: Path, **kwargs: object) -> L.Trainer:
    settings = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        log_every_n_steps=1,
    )
    return L.Trainer(**{**settings, **kwargs})


@pytest.fixture(scope="module", autouse=True)
def _docstrings_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The docstrings SQuAD task caches the standard library's docstrings: in a temporary folder, not the
    user's cache."""
    previous = os.environ.get("LIGHTNING_KD_CACHE")
    os.environ["LIGHTNING_KD_CACHE"] = str(tmp_path_factory.mktemp("kd-cache"))
    yield
    if previous is None:
        os.environ.pop("LIGHTNING_KD_CACHE")
    else:
        os.environ["LIGHTNING_KD_CACHE"] = previous


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("glue_data")
    for task in ("MRPC", "SST-2"):
        write_glue_task(root, task, train=32, dev=16)
    return root


def mrpc(glue_dir: Path) -> GLUEDataModule:
    return GLUEDataModule("mrpc", TOKENIZER, data_dir=str(glue_dir), max_length=64, batch_size=8)


def test_the_heads_are_told_apart() -> None:
    classifier, qa = tiny_modernbert("cls"), tiny_modernbert("qa")
    assert is_classifier(classifier) and not is_question_answering(classifier)
    assert is_question_answering(qa) and not is_classifier(qa)
    assert classifier.config.layer_types == [GLOBAL, LOCAL, LOCAL, GLOBAL]


def test_glue_fine_tuning_reports_the_official_metrics(glue_dir: Path, tmp_path: Path) -> None:
    data = mrpc(glue_dir)
    module = FineTuningModule(tiny_modernbert(), "mrpc", learning_rate=1e-3)
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=2)
    trainer.fit(module, datamodule=data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    (logged,) = trainer.validate(module, datamodule=data, verbose=False)
    # the model's own predictions on the two dev batches, scored here without the library's metrics
    predicted, labels = dev_predictions(module.model, data.val_dataloader(), batches=2)
    accuracy = (predicted == labels).float().mean().item()
    true_positives = int(((predicted == 1) & (labels == 1)).sum())
    f1 = 2 * true_positives / max(int((predicted == 1).sum()) + int((labels == 1).sum()), 1)
    assert logged["val/mrpc/accuracy"] == pytest.approx(accuracy)
    assert logged["val/mrpc/f1"] == pytest.approx(f1)
    assert logged["val/mrpc/score"] == pytest.approx((accuracy + f1) / 2)


@pytest.mark.parametrize("student", ["etd-rand", "etd-impt", "layers"])
def test_task_distillation_exports_a_student_that_reloads_and_predicts_alike(
    student: str, glue_dir: Path, tmp_path: Path
) -> None:
    data = mrpc(glue_dir)
    spec = {
        "etd-rand": ETD_STUDENT,
        # ETD-Impt scores units by the teacher's own loss on the task's data, declared as a recipe declares it
        "etd-impt": {
            **ETD_STUDENT,
            "strategy": "impt",
            "max_batches": 2,
            "data": {
                "class_path": "lightning_kd.GLUEDataModule",
                "init_args": {
                    "task": "mrpc",
                    "tokenizer": TOKENIZER,
                    "data_dir": str(glue_dir),
                    "batch_size": 8,
                },
            },
        },
        "layers": {"init": "layers", "num_layers": 2},
    }[student]
    # layer 0 has no attention norm of its own; layer 1, now first, loses its own and says so
    with pytest.warns(UserWarning, match="layer 1, now first, lost its attention norm"):
        module = DistillationModule(
            tiny_modernbert(),
            spec,
            task="sequence-classification",
            objective=[
                {"term": "logits", "temperature": 2.0},
                {"term": "task"},
                {"term": "hidden", "layers": "uniform"},
            ],
            learning_rate=1e-3,
        )
    assert module.student.config.layer_types == [LOCAL, GLOBAL]
    assert module.student.config.hidden_size == (32 if student == "layers" else 16)
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=2)
    trainer.fit(module, data)
    (logged,) = trainer.validate(module, data, verbose=False)
    assert {"val/mrpc/accuracy", "val/teacher/mrpc/accuracy", "val/gap/mrpc/accuracy"} <= set(logged)
    assert all(torch.isfinite(torch.tensor(value)) for value in logged.values()), logged
    path = module.save_student(tmp_path / "student")
    in_memory = module.student.eval()
    loaded = AutoModelForSequenceClassification.from_pretrained(
        path, attn_implementation=in_memory.config._attn_implementation
    ).eval()
    assert isinstance(loaded, ModernBertForSequenceClassification)
    assert "AutoModelForSequenceClassification.from_pretrained" in (Path(path) / "README.md").read_text()
    assert loaded.config.layer_types == in_memory.config.layer_types
    assert list(loaded.config.id2label.values()) == data.label_names
    batch = next(iter(data.val_dataloader()))
    inputs = {key: batch[key] for key in INPUTS}
    assert (inputs["attention_mask"] == 0).any()  # padded rows: the local layer's windows reach padding
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, in_memory(**inputs).logits, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def small_squad(tmp_path_factory: pytest.TempPathFactory, _docstrings_cache: None) -> Path:
    return write_docstring_squad(
        "v1.1", tmp_path_factory.mktemp("squad"), train_questions=24, dev_questions=16
    )


def squad(folder: Path) -> SQuADDataModule:
    return SQuADDataModule(
        "v1.1", TOKENIZER, str(folder), max_length=96, doc_stride=24, max_query_length=40, batch_size=8
    )


@pytest.fixture(scope="module")
def squad_teacher(
    small_squad: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[FineTuningModule, dict]:
    """A ModernBERT QA model fine-tuned a few steps on the docstrings SQuAD, exported, and its validation."""
    root = tmp_path_factory.mktemp("squad_teacher")
    module = FineTuningModule(
        tiny_modernbert("qa"), task="squad", learning_rate=1e-3, export_dir=str(root / "qa")
    )
    run = quiet_trainer(root, max_steps=3, callbacks=[SquadPredictionWriter(str(root / "answers"))])
    data = squad(small_squad)
    run.fit(module, data)
    (logged,) = run.validate(module, data, verbose=False)
    run.predict(module, data)
    return module, {"logged": logged, "root": root}


def test_squad_fine_tuning_scores_spans_and_its_export_answers_as_predict_does(
    squad_teacher: tuple[FineTuningModule, dict], small_squad: Path
) -> None:
    module, run = squad_teacher
    logged, root = run["logged"], run["root"]
    assert {"val/squad/exact_match", "val/squad/f1", "val/squad/score"} <= set(logged) and logged[
        "val/loss"
    ] > 0
    answers = json.loads((root / "answers" / "predictions.json").read_text())
    data = squad(small_squad)
    reference = data.evaluation_set("predict")
    assert set(answers) == set(reference.ids)
    # the logged scores are the official ones of the answers predict wrote for the same questions
    validation = data.evaluation_set("validation")
    assert validation.ids == reference.ids
    official = squad_v1_scores(answers, dict(zip(validation.ids, validation.answers, strict=True)))
    for name in ("exact_match", "f1"):
        assert logged[f"val/squad/{name}"] == pytest.approx(official[name]), name
    # the exported folder loads as a ModernBERT QA model (its head is `classifier`) and answers as predict did
    loaded = AutoModelForQuestionAnswering.from_pretrained(root / "qa")
    assert isinstance(loaded, ModernBertForQuestionAnswering)
    # and its card says to load it so (a QA head is no classifier, and AutoModel would drop it)
    assert 'AutoModelForQuestionAnswering.from_pretrained("qa")' in (root / "qa" / "README.md").read_text()
    questions = [example.question for example in data.read_split("predict")]
    again = answer_questions(
        root / "qa", questions, reference.contexts, max_length=96, doc_stride=24, max_query_length=40
    )
    assert list(again.answers.values()) == [answers[qid] for qid in reference.ids]


def test_squad_distillation_of_an_etd_student_compares_spans_and_exports(
    squad_teacher: tuple[FineTuningModule, dict], small_squad: Path, tmp_path: Path
) -> None:
    teacher, run = squad_teacher
    data = squad(small_squad)
    with pytest.warns(UserWarning, match="lost its attention norm"):
        module = DistillationModule(teacher.model, ETD_STUDENT, task="question-answering", learning_rate=1e-3)
    assert [term.name for term in module.terms.values()] == ["logits_kl"]  # both predict spans: the KL
    # ETD cut the QA head's columns with the hidden size
    assert module.student.classifier.weight.shape == (2, 16)
    trainer = quiet_trainer(tmp_path, max_steps=2)
    trainer.fit(module, data)
    (logged,) = trainer.validate(module, data, verbose=False)
    for name in ("exact_match", "f1"):
        assert logged[f"val/gap/squad/{name}"] == pytest.approx(
            logged[f"val/teacher/squad/{name}"] - logged[f"val/squad/{name}"]
        )
    assert logged["val/teacher/squad/f1"] == pytest.approx(run["logged"]["val/squad/f1"])
    assert logged["val/logits_kl"] > 0

    batch = next(iter(data.val_dataloader()))
    student = module.student.eval()
    with torch.no_grad():
        features = model_features(student, batch, Needs(logits=True), frozenset())
        out = student(**{key: batch[key] for key in INPUTS})
    assert features.spans and features.logits.shape == (
        len(batch["input_ids"]),
        2,
        batch["input_ids"].shape[1],
    )
    torch.testing.assert_close(features.logits[:, 0], out.start_logits)
    torch.testing.assert_close(features.logits[:, 1], out.end_logits)

    path = module.save_student(tmp_path / "student")
    loaded = AutoModelForQuestionAnswering.from_pretrained(
        path, attn_implementation=student.config._attn_implementation
    ).eval()
    assert isinstance(loaded, ModernBertForQuestionAnswering)
    assert "AutoModelForQuestionAnswering.from_pretrained" in (Path(path) / "README.md").read_text()
    with torch.no_grad():
        again = loaded(**{key: batch[key] for key in INPUTS})
    torch.testing.assert_close(again.start_logits, out.start_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(again.end_logits, out.end_logits, atol=1e-5, rtol=0)


def ted_module() -> DistillationModule:
    teacher = tiny_modernbert(layers=4)
    student = tiny_modernbert(layers=2, hidden=16, seed=1).train()
    return DistillationModule(
        teacher,
        student,
        objective=[{"term": "task"}, {"term": "logits", "weight": 5.0, "temperature": 2.0}],
        task="sequence-classification",
        learning_rate=1e-2,
        schedule="constant",
    )


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_ted_learns_filters_then_distils_through_them(glue_dir: Path, tmp_path: Path) -> None:
    data = GLUEDataModule("sst2", TOKENIZER, data_dir=str(glue_dir), max_length=48, batch_size=8)
    module = ted_module()
    stage_one = TEDFilterCallback(stage="filters", interval=2, save_dir=str(tmp_path / "filters"))
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[stage_one])
    stage_one.setup(trainer, module, "fit")  # adds the filters now, so the snapshot holds them
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    trainer.fit(module, data)
    moved = {name for name, p in module.named_parameters() if not torch.equal(before[name], p.detach())}
    # only the filters and their classifier heads learn, on both sides; both models stay as they were
    assert {name.split(".")[2] for name in moved} == {"ted_task_teacher", "ted_task_student"}, moved
    assert any(".heads." in name for name in moved) and any(".filters." in name for name in moved)
    for side, layers, width in (("teacher", [2, 4], 32), ("student", [1, 2], 16)):
        saved = load_filters(tmp_path / "filters" / f"{side}.pt")
        assert saved.layers == layers and saved.in_width == width and saved.out_width == 32
        assert same(saved, module.objective.terms[f"ted_task_{side}"].filters)

    module = ted_module()
    teacher, student = copy.deepcopy(module.teacher), copy.deepcopy(module.student)
    stage_two = TEDFilterCallback(stage="distill", filters=str(tmp_path / "filters"), interval=2, weight=3.0)
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[stage_two])
    trainer.fit(module, data)
    term = module.objective.terms["ted"]
    assert bool(term.from_stage_one) and term.weight == 3.0
    # the teacher and its stage-I filters stay; the student and its filters learn
    assert same(term.teacher_filters, load_filters(tmp_path / "filters" / "teacher.pt"))
    assert not same(term.student_filters, load_filters(tmp_path / "filters" / "student.pt"))
    assert same(module.teacher, teacher) and not same(module.student, student)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    value = term(module.teacher_features(batch), module.student_features(batch), batch)
    assert torch.isfinite(value) and value > 0 and value.requires_grad
