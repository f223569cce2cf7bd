"""Every LightningModule of the library trains with dropout as configured, however its models were loaded.

``from_pretrained`` returns models in eval mode and Lightning keeps the mode it finds, so each module must
switch what it trains to train mode itself; the teacher stays in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from kd_helpers import VOCAB, tiny_bert_config
from torch import nn
from torch.utils.data import DataLoader
from transformers import BertForSequenceClassification

from lightning_kd import DistillationModule, FineTuningModule
from lightning_kd.training.lifecycle import modules_in_eval_mode


def classifier_folder(root: Path) -> Path:
    torch.manual_seed(0)
    config = tiny_bert_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(root / "model")
    return root / "model"


def batches() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    rows = [
        {
            "input_ids": torch.randint(5, VOCAB, (4, 8), generator=generator),
            "attention_mask": torch.ones(4, 8, dtype=torch.long),
            "labels": torch.tensor([0, 1, 0, 1]),
        }
        for _ in range(3)
    ]
    return DataLoader(rows, batch_size=None)


class ModeProbe(L.Callback):
    def __init__(self, trained: Callable[[L.LightningModule], nn.Module]) -> None:
        self.trained = trained
        self.eval_dropouts: list[str] | None = None
        self.teacher_training: bool | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, i: int
    ) -> None:
        model = self.trained(pl_module)
        dropouts = {name for name, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0}
        assert dropouts, "the probe needs a model with dropout"
        self.eval_dropouts = sorted(dropouts & set(modules_in_eval_mode(model)))
        teacher = getattr(pl_module, "teacher", None)
        self.teacher_training = None if teacher is None else teacher.training


MODULES = {  # name -> (build from a saved folder, the model it trains)
    "finetune-by-name": (lambda folder: FineTuningModule(str(folder), "sst2"), lambda m: m.model),
    "finetune-eval-module": (
        lambda folder: FineTuningModule(BertForSequenceClassification.from_pretrained(folder), "sst2"),
        lambda m: m.model,
    ),
    "distill-student-by-name": (
        lambda folder: DistillationModule(str(folder), str(folder), task="sequence-classification"),
        lambda m: m.student,
    ),
    "distill-student-copy": (
        lambda folder: DistillationModule(str(folder), {"init": "copy"}, task="sequence-classification"),
        lambda m: m.student,
    ),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_training_runs_with_dropout_on_and_the_teacher_frozen(name: str, tmp_path: Path) -> None:
    build, trained = MODULES[name]
    module = build(classifier_folder(tmp_path))
    probe = ModeProbe(trained)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[probe],
    )
    trainer.fit(module, train_dataloaders=batches())
    assert probe.eval_dropouts == [], f"dropout modules left in eval mode: {probe.eval_dropouts}"
    if probe.teacher_training is not None:
        assert probe.teacher_training is False
