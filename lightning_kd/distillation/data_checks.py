"""Which data the models can take, and which labels the task reads: checked before the first step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_kd.datamodules.squad_tasks import SquadTask
from lightning_kd.models.layers import is_classifier, is_question_answering, max_sequence_length


def check_models_fit_data(datamodule: Any, models: Mapping[str, nn.Module]) -> None:
    """Refuse, before the first step, data the models cannot take: sequences longer than their position
    embeddings, or a task whose label count is not their classifier's."""
    max_length = getattr(datamodule, "max_length", None)
    task = getattr(datamodule, "task", None)
    for name, model in models.items():
        limit = max_sequence_length(model)
        if isinstance(max_length, int) and limit is not None and max_length > limit:
            raise ValueError(
                f"the data's max_length={max_length} is longer than the {name}'s {limit} positions "
                f"(max_position_embeddings); set the DataModule's max_length to at most {limit}."
            )
        if isinstance(task, SquadTask) and not is_question_answering(model):
            raise ValueError(
                f"the data is SQuAD ({task.name}), whose answers are spans, but the {name} ({type(model).__name__}) "
                "has no question-answering head: load it with AutoModelForQuestionAnswering (task: "
                "question-answering in DistillationModule, task: squad in FineTuningModule)."
            )
        labels = getattr(task, "num_labels", None)
        if labels is not None and is_classifier(model) and model.config.num_labels != labels:
            raise ValueError(
                f"the {name}'s classifier predicts {model.config.num_labels} labels, but task {task.name!r} has "
                f"{labels}; load it with num_labels={labels} (DistillationModule(num_labels=...) for a named "
                "teacher), or use the task it was trained for."
            )


def check_task_fits_data(task: str, datamodule: Any) -> None:
    """The module's ``task`` must read the labels the DataModule makes: token labels (MLM) or one per example."""
    glue = getattr(datamodule, "task", None)
    squad = isinstance(glue, SquadTask)
    if task == "question-answering" and not squad:
        raise ValueError(
            "task='question-answering' predicts answer spans, but the DataModule is not SQuAD's; use a "
            "SQuADDataModule, or the task that fits the data (sequence-classification for GLUE, masked-lm for text)."
        )
    if squad and task == "sequence-classification":
        raise ValueError(
            f"the DataModule gives SQuAD ({glue.name}) answer spans; use task: question-answering (with a "
            "question-answering teacher) to distil on it."
        )
    if task == "masked-lm" and glue is not None:
        raise ValueError(
            f"task='masked-lm' predicts tokens, but the DataModule gives task {glue.name!r} one label "
            "per example; use task: sequence-classification (with a classifier teacher)."
        )
    lm = getattr(datamodule, "lm", None)
    if task == "causal-lm" and (lm == "mlm" or glue is not None):
        raise ValueError(
            "task='causal-lm' predicts each next token, but the DataModule does not make causal-LM batches; use "
            "PretrainingDataModule(lm='causal') (and a folder prepared with `lightning-kd prepare --lm causal`)."
        )
    if task == "masked-lm" and lm == "causal":
        raise ValueError(
            "task='masked-lm' reads masked tokens, but the DataModule makes causal-LM batches (lm='causal'); use "
            "task: causal-lm with decoder models, or lm: mlm for masked LMs."
        )
    if task == "sequence-classification" and hasattr(datamodule, "mlm_probability"):
        raise ValueError(
            "task='sequence-classification' predicts one label per example, but the DataModule makes "
            "masked-token (MLM) batches; use task: masked-lm, or a GLUEDataModule."
        )
