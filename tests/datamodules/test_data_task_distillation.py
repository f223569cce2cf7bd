"""Task-specific distillation: the DistillationModule with a GLUE DataModule reports the task's official metrics."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from kd_datafiles import TOKENIZER
from transformers import BertConfig, BertForSequenceClassification

from lightning_kd import DistillationModule, GLUEDataModule


def classifier(num_labels: int, layers: int) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128, num_labels=num_labels)
    return BertForSequenceClassification(config)


def test_distillation_on_mnli_logs_official_metrics_for_both_validation_splits(glue_dir: Path) -> None:
    module = DistillationModule(classifier(3, 2), {"init": "layers", "num_layers": 1},
                                objective=[{"term": "logits", "temperature": 2.0}, {"term": "task"}])
    data = GLUEDataModule("mnli", TOKENIZER, data_dir=str(glue_dir / "MNLI"), max_length=32, batch_size=8)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2)
    trainer.fit(module, data)
    trainer.validate(module, data, verbose=False)
    metrics = trainer.callback_metrics
    for split in ("validation_matched", "validation_mismatched"):
        assert 0.0 <= float(metrics[f"val/mnli/{split}/accuracy"]) <= 1.0
    assert "val/logits_kl/dataloader_idx_0" in metrics and "val/task/dataloader_idx_1" in metrics


def test_distillation_on_stsb_matches_scores_instead_of_a_one_class_kl(glue_dir: Path) -> None:
    module = DistillationModule(classifier(1, 2), {"init": "layers", "num_layers": 1},
                                objective=[{"term": "logits"}, {"term": "task"}])
    data = GLUEDataModule("stsb", TOKENIZER, data_dir=str(glue_dir / "STS-B"), max_length=32, batch_size=8)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    loss, terms = module.objective(module.teacher_features(batch), module.student_features(batch), batch)
    assert terms["logits_kl"] > 0  # MSE between the two regressors' scores, never a silent zero
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2)
    trainer.fit(module, data)
    trainer.validate(module, data, verbose=False)
    assert {"val/stsb/pearson", "val/stsb/spearman"} <= set(trainer.callback_metrics)


def test_fine_tuned_model_is_exported_with_its_tokenizer(glue_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lightning_kd import FineTuningModule

    module = FineTuningModule(classifier(2, 1), task="sst2", export_dir=str(tmp_path / "teacher"))
    data = GLUEDataModule("sst2", TOKENIZER, data_dir=str(glue_dir / "SST-2"), max_length=32, batch_size=8)
    L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(module, data)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "teacher")
    assert loaded.config.num_labels == 2
    assert AutoTokenizer.from_pretrained(tmp_path / "teacher").vocab_size == 30522
