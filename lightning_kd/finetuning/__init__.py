"""FineTuningModule: fine-tune and evaluate any model on a task with its official metrics (teachers for
task-specific distillation and TED, students after task-agnostic distillation)."""

from lightning_kd.finetuning.module import FineTuningModule, sequence_logits

__all__ = ["FineTuningModule", "sequence_logits"]
