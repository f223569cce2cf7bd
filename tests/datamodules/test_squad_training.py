"""SQuAD end to end on the offline docstrings task: fine-tuning and distilling QA models, the official scores
logged by validate and written by predict, the teacher's scores and the gap, the teacher cache on windows, and
an export that answers as predict does."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from kd_datafiles import TOKENIZER
from transformers import AutoModelForQuestionAnswering, BertConfig, BertForQuestionAnswering

from lightning_kd import (
    DistillationModule,
    FineTuningModule,
    GLUEDataModule,
    SQuADDataModule,
    answer_questions,
)
from lightning_kd.callbacks.submission import SquadPredictionWriter
from lightning_kd.datamodules.squad_docstrings import write_docstring_squad
from lightning_kd.datamodules.squad_metrics import squad_v1_scores, squad_v2_scores

pytestmark = pytest.mark.usefixtures("one_thread")


def qa_model(layers: int = 2, seed: int = 0) -> BertForQuestionAnswering:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    return BertForQuestionAnswering(config).eval()


@pytest.fixture(scope="module")
def small_squad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The docstrings task at a size a few steps cover, both versions."""
    root = tmp_path_factory.mktemp("squad")
    return {
        version: write_docstring_squad(version, root / version, train_questions=48, dev_questions=24)
        for version in ("v1.1", "v2.0")
    }


def squad(folder: Path, version: str = "v2.0", **kwargs: object) -> SQuADDataModule:
    settings = dict(max_length=96, doc_stride=24, max_query_length=40, batch_size=8)
    return SQuADDataModule(version, TOKENIZER, str(folder), **{**settings, **kwargs})


def trainer(root: Path, **kwargs: object) -> L.Trainer:
    settings = dict(
        accelerator="cpu",
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )
    return L.Trainer(**{**settings, **kwargs})


def test_fine_tuning_validates_with_the_official_scores_and_predict_writes_what_they_score(
    small_squad: dict[str, Path], tmp_path: Path
) -> None:
    data = squad(small_squad["v2.0"])
    module = FineTuningModule(
        qa_model(), task="squad_v2", learning_rate=1e-3, export_dir=str(tmp_path / "qa")
    )
    run = trainer(tmp_path, callbacks=[SquadPredictionWriter(str(tmp_path / "answers"))])
    run.fit(module, data)
    (logged,) = run.validate(module, data, verbose=False)
    for name in ("exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1", "best_f1_thresh", "score"):
        assert f"val/squad_v2/{name}" in logged
    assert logged["val/loss"] > 0
    run.predict(module, data)
    answers = json.loads((tmp_path / "answers" / "predictions.json").read_text())
    odds = json.loads((tmp_path / "answers" / "null_odds.json").read_text())
    reference = data.evaluation_set("predict")
    assert set(answers) == set(odds) == set(reference.ids)
    # the files, scored as the official script scores them, give what validate logged
    scores = squad_v2_scores(answers, reference.golds, odds, threshold=float("inf"))
    assert scores["f1"] == pytest.approx(logged["val/squad_v2/f1"])
    assert scores["best_f1"] == pytest.approx(logged["val/squad_v2/best_f1"])

    # the export loads as a QA model and answers as predict did (transformers 5 has no QA pipeline any more)
    loaded = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "qa")
    assert isinstance(loaded, BertForQuestionAnswering)
    questions = [example.question for example in data.read_split("predict")]
    again = answer_questions(
        tmp_path / "qa",
        questions,
        reference.contexts,
        version_2=True,
        max_length=96,
        doc_stride=24,
        max_query_length=40,
    )
    assert list(again.answers.values()) == [answers[qid] for qid in reference.ids]
    assert list(again.null_odds.values()) == pytest.approx([odds[qid] for qid in reference.ids], abs=1e-4)
    card = (tmp_path / "qa" / "README.md").read_text()
    assert "squad_v2" in card and "f1" in card


def test_distillation_logs_the_teachers_scores_the_gap_and_exports_a_qa_student(
    small_squad: dict[str, Path], tmp_path: Path
) -> None:
    data = squad(small_squad["v1.1"], "v1.1")
    module = DistillationModule(qa_model(), {"init": "layers", "num_layers": 1}, task="question-answering")
    assert [term.name for term in module.terms.values()] == ["logits_kl"]  # both predict spans: the KL
    run = trainer(tmp_path, max_steps=3)
    run.fit(module, data)
    (logged,) = run.validate(module, data, verbose=False)
    for name in ("exact_match", "f1"):
        student, teacher = logged[f"val/squad/{name}"], logged[f"val/teacher/squad/{name}"]
        assert logged[f"val/gap/squad/{name}"] == pytest.approx(teacher - student)
    assert logged["val/logits_kl"] > 0 and "val/discrepancy/kl" in logged
    # the teacher's score is its own: the same module on the teacher alone gives it
    alone = FineTuningModule(module.teacher, task="squad")
    (own,) = trainer(tmp_path).validate(alone, data, verbose=False)
    assert own["val/squad/f1"] == pytest.approx(logged["val/teacher/squad/f1"])

    path = module.save_student(tmp_path / "student")
    card = (Path(path) / "README.md").read_text()
    for name in ("val/squad/f1", "val/teacher/squad/f1", "val/gap/squad/exact_match"):
        assert f"| {name} |" in card
    loaded = AutoModelForQuestionAnswering.from_pretrained(path).eval()
    batch = next(iter(data.val_dataloader()))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**inputs).start_logits, module.student.eval()(**inputs).start_logits
        )


def test_the_teacher_cache_serves_windows_and_changes_nothing(
    small_squad: dict[str, Path], tmp_path: Path
) -> None:
    def distil(**kwargs: object) -> tuple[DistillationModule, int]:
        teacher = qa_model()
        torch.manual_seed(1)
        module = DistillationModule(
            teacher,
            {"init": "layers", "num_layers": 1},
            task="question-answering",
            objective=[{"term": "task"}, {"term": "logits", "temperature": 2.0}],
            **kwargs,
        )
        calls = []  # counted once the student is copied, so that the copy does not count too
        forward = teacher.forward
        teacher.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]
        trainer(tmp_path, max_steps=-1, max_epochs=2, limit_val_batches=0, log_every_n_steps=1000).fit(
            module, squad(small_squad["v1.1"], "v1.1")
        )
        return module, len(calls)

    plain, plain_calls = distil()
    cached, cached_calls = distil(teacher_cache="memory")
    assert cached_calls * 2 == plain_calls  # the second epoch is served from the cache
    for (name, a), b in zip(
        plain.student.state_dict().items(), cached.student.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_qa_tasks_refuse_data_and_models_that_do_not_fit(
    small_squad: dict[str, Path], glue_dir: Path, tmp_path: Path
) -> None:
    data = squad(small_squad["v1.1"], "v1.1")
    with pytest.raises(ValueError, match="SQuAD v1.1: set task: squad or the DataModule's version: v2.0"):
        trainer(tmp_path).validate(FineTuningModule(qa_model(), task="squad_v2"), data, verbose=False)
    glue = GLUEDataModule("sst2", TOKENIZER, data_dir=str(glue_dir / "SST-2"), max_length=32)
    with pytest.raises(ValueError, match="give the Trainer a SQuADDataModule"):
        trainer(tmp_path).validate(FineTuningModule(qa_model(), task="squad"), glue, verbose=False)
    with pytest.raises(ValueError, match="task='question-answering' predicts answer spans.*SQuADDataModule"):
        trainer(tmp_path).fit(
            DistillationModule(qa_model(), {"init": "copy"}, task="question-answering"), glue
        )
    from transformers import BertForSequenceClassification

    classifier = BertForSequenceClassification(qa_model().config).eval()
    with pytest.raises(
        ValueError, match="has no question-answering head: load it with AutoModelForQuestionAnswering"
    ):
        trainer(tmp_path).fit(
            DistillationModule(classifier, {"init": "copy"}, task="sequence-classification"), data
        )
    with pytest.raises(ValueError, match="unknown task 'squad3'.*squad / squad_v2"):
        FineTuningModule(qa_model(), task="squad3")


def test_v1_predictions_score_as_validate_does(small_squad: dict[str, Path], tmp_path: Path) -> None:
    data = squad(small_squad["v1.1"], "v1.1")
    module = FineTuningModule(qa_model(), task="squad")
    run = trainer(tmp_path, callbacks=[SquadPredictionWriter(str(tmp_path / "answers"))])
    (logged,) = run.validate(module, data, verbose=False)
    run.predict(module, data)
    assert not (tmp_path / "answers" / "null_odds.json").exists()
    answers = json.loads((tmp_path / "answers" / "predictions.json").read_text())
    scores = squad_v1_scores(answers, data.evaluation_set().golds)
    assert scores["exact_match"] == pytest.approx(logged["val/squad/exact_match"])
    assert scores["f1"] == pytest.approx(logged["val/squad/f1"])
