"""Each GLUE task's official metrics, per validation split, as one module a LightningModule can own.

The metrics are torchmetrics objects, so under DDP ``compute`` gathers every rank's predictions before it
computes MCC, F1 or a correlation (which, unlike accuracy, cannot be averaged over ranks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchmetrics
from torch import nn

from lightning_kd.datamodules.glue_tasks import get_task

# Official metric name -> how to build it for a task with ``num_labels`` classes.
_BUILDERS = {
    "matthews_correlation": lambda n: torchmetrics.MatthewsCorrCoef(task="multiclass", num_classes=n),
    "f1": lambda n: torchmetrics.F1Score(task="binary"),
    "accuracy": lambda n: torchmetrics.Accuracy(task="multiclass", num_classes=n),
    "pearson": lambda n: torchmetrics.PearsonCorrCoef(),
    "spearman": lambda n: torchmetrics.SpearmanCorrCoef(),
}


class TaskMetrics(nn.Module):
    """Official GLUE metrics for one task, kept apart for each validation split.

    ``compute`` returns ``{"val/<task>/<metric>": value}`` with one split, and
    ``{"val/<task>/<split>/<metric>": value}`` with several (MNLI), plus ``val/<task>/score``: the mean of
    all of them, one number to monitor for checkpoints and early stopping.
    """

    target_key = "labels"  # what update() reads of a batch

    def __init__(
        self,
        task: str,
        metric_names: Sequence[str],
        num_labels: int,
        split_names: Sequence[str] = ("validation",),
        prefix: str = "val",
    ) -> None:
        super().__init__()
        self.task = task
        self.metric_names = list(metric_names)
        self.num_labels = num_labels
        self.split_names = list(split_names)
        self.prefix = prefix
        self.is_regression = num_labels == 1
        self.splits = nn.ModuleList(
            nn.ModuleDict({name: _BUILDERS[name](num_labels) for name in self.metric_names})
            for _ in self.split_names
        )

    @classmethod
    def for_task(
        cls, task: str, split_names: Sequence[str] | None = None, prefix: str = "val"
    ) -> TaskMetrics:
        spec = get_task(task)
        return cls(spec.name, spec.metrics, spec.num_labels, split_names or spec.validation_splits, prefix)

    def predictions(self, logits_or_scores: torch.Tensor) -> torch.Tensor:
        """Scores for regression (``[B]`` or ``[B, 1]``), class ids for classification."""
        if self.is_regression:
            return logits_or_scores.reshape(-1).float()
        if logits_or_scores.dim() == 1:
            return logits_or_scores.long()
        return logits_or_scores.argmax(dim=-1)

    @torch.no_grad()
    def update(self, logits_or_scores: torch.Tensor, labels: torch.Tensor, dataloader_idx: int = 0) -> None:
        predictions = self.predictions(logits_or_scores.detach())
        labels = labels.detach().reshape(-1)
        labels = labels.float() if self.is_regression else labels.long()
        for metric in self.splits[dataloader_idx].values():
            metric.update(predictions, labels)

    def compute(self) -> dict[str, float]:
        results: dict[str, float] = {}
        for split, metrics in zip(self.split_names, self.splits, strict=True):
            for name, metric in metrics.items():
                if not metric.update_called:
                    continue
                key = [self.prefix, self.task] + ([split] if len(self.split_names) > 1 else []) + [name]
                results["/".join(key)] = float(metric.compute())
        if results:
            results[f"{self.prefix}/{self.task}/score"] = sum(results.values()) / len(results)
        return results

    def reset(self) -> None:
        for metrics in self.splits:
            for metric in metrics.values():
                metric.reset()


def split_names(trainer: object, count: int) -> list[str]:
    """Names of the ``count`` evaluation dataloaders: the DataModule's ``validation_names`` (MNLI's
    ``validation_matched``/``validation_mismatched``) when it has them, else ``dataloader_idx_<i>``."""
    names = getattr(getattr(trainer, "datamodule", None), "validation_names", None)
    if names is not None and len(names) == count:
        return list(names)
    return [f"dataloader_idx_{i}" for i in range(count)]


def loss_key(trainer: object, stage: str, name: str, dataloader_idx: int) -> str:
    """``<stage>/<name>``, with the evaluation set's name appended when there are several (MNLI's losses say
    matched and mismatched, as its metrics do, rather than Lightning's ``dataloader_idx_0/1``)."""
    counts = getattr(trainer, "num_val_batches" if stage == "val" else "num_test_batches", None) or [0]
    if len(counts) <= 1:
        return f"{stage}/{name}"
    return f"{stage}/{name}/{split_names(trainer, len(counts))[dataloader_idx]}"
