"""Task-specific distillation: the DistillationModule with a GLUE DataModule reports the task's official metrics."""

from __future__ import annotations

import itertools
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers_data import dev_predictions
from kd_datafiles import TOKENIZER
from transformers import BertConfig, BertForSequenceClassification

from lightning_kd import DistillationModule, GLUEDataModule


def classifier(num_labels: int, layers: int) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def test_distillation_on_mnli_logs_official_metrics_for_both_validation_splits(glue_dir: Path) -> None:
    module = DistillationModule(
        classifier(3, 2),
        {"init": "layers", "num_layers": 1},
        objective=[{"term": "logits", "temperature": 2.0}, {"term": "task"}],
    )
    data = GLUEDataModule("mnli", TOKENIZER, data_dir=str(glue_dir / "MNLI"), max_length=32, batch_size=8)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
    )
    trainer.fit(module, data)
    trainer.validate(module, data, verbose=False)
    metrics = trainer.callback_metrics
    # each set's accuracy is the student's own on that set's two batches, computed here without the metrics
    loaders = data.val_dataloader()
    for split, loader in zip(("validation_matched", "validation_mismatched"), loaders, strict=True):
        predicted, labels = dev_predictions(module.student, loader, batches=2)
        assert len(labels) == 16
        expected = (predicted == labels).float().mean().item()
        assert float(metrics[f"val/mnli/{split}/accuracy"]) == pytest.approx(expected), split
    # losses are named by the set, as the metrics are, not dataloader_idx_0/1
    assert "val/logits_kl/validation_matched" in metrics and "val/task/validation_mismatched" in metrics
    assert not any("dataloader_idx" in key for key in metrics)


def test_validation_reports_the_teacher_once_per_set_and_the_gap(glue_dir: Path) -> None:
    teacher = classifier(3, 2).eval()
    module = DistillationModule(teacher, {"init": "layers", "num_layers": 1}, objective=[{"term": "logits"}])
    data = GLUEDataModule("mnli", TOKENIZER, data_dir=str(glue_dir / "MNLI"), max_length=32, batch_size=8)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
    )
    trainer.fit(module, data)
    updates = []
    original = module.teacher_metrics["val"].update
    module.teacher_metrics["val"].update = lambda *a, **k: (updates.append(1), original(*a, **k))
    first = trainer.validate(module, data, verbose=False)
    second = trainer.validate(module, data, verbose=False)
    assert len(updates) == 4  # 2 batches x 2 sets in the first validate; the second reuses the cached values
    assert first == second
    # the teacher's accuracy, computed by hand on the same batches
    for i, split in enumerate(("validation_matched", "validation_mismatched")):
        loader = data.val_dataloader()[i]
        rows = list(itertools.islice(loader, 2))
        with torch.no_grad():
            right = sum(
                int(
                    (
                        teacher(
                            **{k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
                        ).logits.argmax(-1)
                        == b["labels"]
                    ).sum()
                )
                for b in rows
            )
        expected = right / sum(len(b["labels"]) for b in rows)
        metrics = trainer.callback_metrics
        assert float(metrics[f"val/teacher/mnli/{split}/accuracy"]) == pytest.approx(expected)
        gap = float(metrics[f"val/teacher/mnli/{split}/accuracy"]) - float(
            metrics[f"val/mnli/{split}/accuracy"]
        )
        assert float(metrics[f"val/gap/mnli/{split}/accuracy"]) == pytest.approx(gap)
    assert any(
        "gap" in line and "validation_matched/accuracy" in line for line in module.evaluation_summary()
    )


def test_distillation_on_stsb_refuses_a_one_class_kl_and_matches_scores_when_asked(glue_dir: Path) -> None:
    with pytest.raises(ValueError, match="identically 0 on a one-output"):
        DistillationModule(
            classifier(1, 2), {"init": "layers", "num_layers": 1}, objective=[{"term": "logits"}]
        )
    default = DistillationModule(classifier(1, 2), {"init": "layers", "num_layers": 1})
    assert [term.name for term in default.objective.terms.values()] == ["logits_mse"]
    module = DistillationModule(
        classifier(1, 2),
        {"init": "layers", "num_layers": 1},
        objective=[{"term": "logits", "loss": "mse"}, {"term": "task"}],
    )
    data = GLUEDataModule("stsb", TOKENIZER, data_dir=str(glue_dir / "STS-B"), max_length=32, batch_size=8)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    teacher, student = module.teacher_features(batch), module.student_features(batch)
    _, terms = module.objective(teacher, student, batch)
    expected = (student.logits.float() - teacher.logits.float()).pow(2).mean()
    assert float(terms["logits_mse"]) > 0 and float(terms["logits_mse"]) == pytest.approx(
        float(expected), rel=1e-5
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
    )
    trainer.fit(module, data)
    trainer.validate(module, data, verbose=False)
    assert {"val/stsb/pearson", "val/stsb/spearman"} <= set(trainer.callback_metrics)
    discrepancy = module.discrepancy([batch])
    assert "discrepancy/kl" not in discrepancy and discrepancy["discrepancy/mse"] > 0


def test_fine_tuned_model_is_exported_with_its_tokenizer(glue_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lightning_kd import FineTuningModule

    module = FineTuningModule(classifier(2, 1), task="sst2", export_dir=str(tmp_path / "teacher"))
    data = GLUEDataModule("sst2", TOKENIZER, data_dir=str(glue_dir / "SST-2"), max_length=32, batch_size=8)
    L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    ).fit(module, data)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "teacher")
    assert loaded.config.num_labels == 2
    assert AutoTokenizer.from_pretrained(tmp_path / "teacher").vocab_size == 30522
