"""Fine-tuning and evaluating a model on a GLUE task (a sequence classifier), on SQuAD (extractive question
answering), with the task's official metrics, or on text as a causal LM (next-token loss, perplexity)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.nn import functional as F
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)
from typing_extensions import override

from lightning_kd.batch import IGNORE_INDEX
from lightning_kd.datamodules.causal import Perplexity
from lightning_kd.datamodules.common import task_metrics
from lightning_kd.datamodules.glue_metrics import TaskMetrics, loss_key
from lightning_kd.datamodules.glue_tasks import TASKS, GLUETask, get_task
from lightning_kd.datamodules.squad_tasks import SquadTask, get_squad_task, is_squad_task
from lightning_kd.hub import load_model
from lightning_kd.objective.predictions import span_cross_entropy
from lightning_kd.pruning.export import check_export_dir
from lightning_kd.training.checkpoints import check_checkpoint_fits, check_resume, resuming_fit
from lightning_kd.training.export import CardFacts, export_model
from lightning_kd.training.lifecycle import default_callbacks, train_mode_for_fit
from lightning_kd.training.lightning_internals import attached_trainer
from lightning_kd.training.optimizer import adamw_with_warmup
from lightning_kd.training.provenance import made_with
from lightning_kd.training.run_checks import check_fit_length, check_run


def sequence_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's ``[B, num_labels]`` logits, passing only the inputs its forward accepts.

    DistilBERT-style models take no ``token_type_ids``; a plain module may return a tensor, not an output.
    """
    parameters = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    inputs = {
        key: batch[key]
        for key in ("input_ids", "attention_mask", "token_type_ids")
        if key in batch and (takes_any or key in parameters)
    }
    output = model(**inputs)
    if getattr(output, "start_logits", None) is not None:  # a QA head: its start and end scores, [B, 2, T]
        return torch.stack([output.start_logits, output.end_logits], dim=1)
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if logits is None:
        logits = output[0]
    return logits


CAUSAL_LM = "causal-lm"


def find_task(name: str) -> GLUETask | SquadTask:
    """A GLUE task or a SQuAD version by name, or an error naming them all."""
    if is_squad_task(name):
        return get_squad_task(name)
    try:
        return get_task(name)
    except ValueError:
        raise ValueError(
            f"unknown task {name!r}: use a GLUE task ({', '.join(TASKS)}), squad / squad_v2 (SQuAD v1.1, v2.0) "
            f"or {CAUSAL_LM} (next-token prediction on text)"
        ) from None


def new_model(config: Mapping[str, Any], model_class: Any, **kwargs: Any) -> PreTrainedModel:
    """A ``model_class`` with fresh weights (drawn from the global seed) built from config fields, ``model_type``
    among them: a model trained from scratch, as the offline decoder demo's teacher is."""
    fields = dict(config)
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise ValueError(
            f"a model declared by its config needs model_type (llama, bert, qwen2, ...) among the fields, got "
            f"{sorted(fields)}: add model_type, or give a hub name or folder to start from trained weights"
        )
    return model_class.from_config(AutoConfig.for_model(model_type, **fields), **kwargs)


class FineTuningModule(L.LightningModule):
    """Fine-tunes a model on a GLUE task or SQuAD (AdamW, linear warmup then decay) and validates with the task's
    official metrics (GLUE's TaskMetrics; SQuAD's exact match and F1, see SquadMetrics).

    Args:
        model: a hub name or folder (loaded with ``AutoModelForSequenceClassification`` and the task's
            ``num_labels``, ``AutoModelForQuestionAnswering`` for SQuAD, ``AutoModelForCausalLM`` for
            ``causal-lm``); config fields with ``model_type`` (``{model_type: llama, hidden_size: 64, ...}``) for
            a model of that shape with fresh weights, trained from scratch; or a module mapping a batch to
            ``[B, num_labels]`` logits (a QA model: an output with ``start_logits`` and ``end_logits``).
        task: the GLUE task, which fixes ``num_labels``, the loss (MSE for STS-B) and the metrics; ``squad`` /
            ``squad_v2`` (SQuAD v1.1 / v2.0: the mean of the start and end cross-entropies, EM and F1); or
            ``causal-lm``: next-token prediction on ``PretrainingDataModule(lm="causal")`` text, the model's own
            shifted cross-entropy, and ``val/perplexity`` over every predicted token of the validation text
            (the DataModule's ``val_sources``). Its logits are computed whole, as the model computes its own
            loss: fine at a fine-tuning batch size, where DistillationModule reads them a chunk at a time.
        warmup_ratio: the share of all optimizer steps spent warming the learning rate up from 0.
        export_dir: when training ends, save the model there as a Hugging Face folder, with the DataModule's
            tokenizer, the task's label names and a model card (a fine-tuned teacher for task-specific
            distillation or TED, for instance).
        push_to_hub: a hub repo id (``me/minilm-sst2``) to upload the exported folder to; ``private`` repo by
            default.
        allow_changes: hyper-parameters that may differ from the checkpoint this run resumes (see
            :func:`lightning_kd.training.checkpoints.check_resume`).
    """

    def __init__(
        self,
        model: str | dict[str, Any] | nn.Module,
        task: str,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        adam_epsilon: float = 1e-8,
        model_kwargs: dict[str, Any] | None = None,
        export_dir: str | None = None,
        push_to_hub: str | None = None,
        private: bool = True,
        allow_changes: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        self.causal = task == CAUSAL_LM
        self.task = None if self.causal else find_task(task)
        self.answers_spans = isinstance(self.task, SquadTask)
        if isinstance(model, nn.Module):
            self.model = model
        elif self.causal or self.answers_spans:
            model_class = AutoModelForCausalLM if self.causal else AutoModelForQuestionAnswering
            self.model = self._model(model, model_class, {}, model_kwargs)
        else:
            labels = {"num_labels": self.task.num_labels}
            self.model = self._model(model, AutoModelForSequenceClassification, labels, model_kwargs)
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.adam_epsilon = adam_epsilon
        if push_to_hub and not export_dir:
            raise ValueError("push_to_hub uploads the exported folder: set export_dir too")
        self.export_dir = export_dir
        self.push_to_hub, self.private = push_to_hub, private
        self.last_metrics: dict[str, float] = {}
        # SQuAD's metrics score against the DataModule's evaluation set, so they are made in setup()
        self.metrics: nn.Module | None
        self.test_metrics: nn.Module | None
        if self.causal:
            self.metrics, self.test_metrics = Perplexity(), Perplexity()
        elif self.answers_spans:
            self.metrics = self.test_metrics = None
        else:
            self.metrics = TaskMetrics.for_task(self.task.name)
            self.test_metrics = TaskMetrics.for_task(self.task.name, prefix="test")

    @staticmethod
    def _model(
        model: str | Mapping[str, Any], model_class: Any, task: dict[str, Any], options: dict[str, Any] | None
    ) -> nn.Module:
        if isinstance(model, Mapping):
            return new_model({**model, **task}, model_class, **(options or {}))
        return load_model(model, model_class, **task, **(options or {}))

    @override
    def setup(self, stage: str) -> None:
        check_run(self, stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.causal and datamodule is not None and getattr(datamodule, "lm", None) != "causal":
            raise ValueError(
                f"task={CAUSAL_LM!r} predicts each next token of text, but {type(datamodule).__name__} does not make "
                "causal-LM batches: use PretrainingDataModule(lm='causal')."
            )
        if not self.answers_spans or self.metrics is not None or stage == "predict":
            return
        data_task = getattr(datamodule, "task", None)
        if not isinstance(data_task, SquadTask):
            raise ValueError(
                f"task {self.task.name!r} is scored on SQuAD's windows: give the Trainer a SQuADDataModule "
                f"(version {self.task.version})."
            )
        if data_task != self.task:
            raise ValueError(
                f"the module's task is {self.task.name!r} (SQuAD {self.task.version}) but the data is SQuAD "
                f"{data_task.version}: set task: {data_task.name} or the DataModule's version: {self.task.version}."
            )
        self.metrics = task_metrics(datamodule).to(self.device)
        self.test_metrics = task_metrics(datamodule, prefix="test").to(self.device)

    @override
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return sequence_logits(self.model, batch)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.causal:
            # the logits at position i predict the label at i + 1, as the model's own loss shifts them
            return F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                batch["labels"][:, 1:].flatten(),
                ignore_index=IGNORE_INDEX,
            )
        if self.answers_spans:
            return span_cross_entropy(logits, batch)
        labels = batch["labels"]
        if self.task.is_regression:
            return F.mse_loss(logits.reshape(-1).float(), labels.float())
        return F.cross_entropy(logits.float(), labels.long())

    @override
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch), batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    @override
    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._evaluate(batch, dataloader_idx, "val", self.metrics)

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx, "test", self.test_metrics)

    def _evaluate(
        self, batch: dict[str, torch.Tensor], dataloader_idx: int, stage: str, metrics: TaskMetrics
    ) -> None:
        logits = self(batch)
        loss = self.loss(logits, batch)
        if self.causal:
            tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
            metrics.update(loss * tokens, tokens)
        else:
            metrics.update(logits, batch[metrics.target_key], dataloader_idx)
        self.log(
            loss_key(self.trainer, stage, "loss", dataloader_idx),
            loss,
            batch_size=batch["input_ids"].shape[0],
            add_dataloader_idx=False,
            sync_dist=True,
        )

    @override
    def on_validation_epoch_end(self) -> None:
        # torchmetrics already synchronises across ranks in compute(); logging plain floats keeps it at that.
        self.last_metrics = self._computed(self.metrics, "val")
        self.log_dict(self.last_metrics, prog_bar=True)
        self.metrics.reset()

    @override
    def on_test_epoch_end(self) -> None:
        self.log_dict(self._computed(self.test_metrics, "test"))
        self.test_metrics.reset()

    def _computed(self, metrics: nn.Module, stage: str) -> dict[str, float]:
        if self.causal:
            return {f"{stage}/perplexity": float(metrics.compute())}
        return metrics.compute()

    @override
    def predict_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        """The logits of a test-set batch with its GLUE indices (or SQuAD windows), as
        :class:`~lightning_kd.GLUESubmissionWriter` (:class:`~lightning_kd.SquadPredictionWriter`) reads them."""
        if self.causal:
            raise ValueError(
                f"predict writes task predictions, and {CAUSAL_LM} has none: generate text with the exported folder "
                "(AutoModelForCausalLM.from_pretrained(export_dir).generate(...)), or measure perplexity with "
                "`lightning-kd validate`."
            )
        key = "window" if self.answers_spans else "idx"
        return {key: batch[key], "logits": self(batch)}

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lightning_kd"] = {"made_with": made_with(self, self.model)}  # task, head, tokenizer

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_fits(checkpoint, self, "model")  # another task's head, named before torch's list
        if resuming_fit(self):
            check_resume(checkpoint, self.hparams, self.hparams.get("allow_changes", ()))

    @override
    def on_fit_start(self) -> None:
        train_mode_for_fit(self)
        check_fit_length(attached_trainer(self))
        if self.export_dir is not None:
            check_export_dir(self.export_dir)

    @override
    @rank_zero_only
    def on_train_end(self) -> None:
        if self.export_dir is None:
            return
        datamodule = self.trainer.datamodule
        label_names = getattr(datamodule, "label_names", None) or list(
            getattr(self.task, "class_names", ()) or getattr(self.task, "labels", ())
        )
        source = self.hparams.get("model") or getattr(
            getattr(self.model, "config", None), "_name_or_path", ""
        )
        task = CAUSAL_LM if self.causal else self.task.name
        method = f"fine-tuned on {task}"
        if isinstance(source, Mapping):  # no model it started from: a config
            source, method = "", f"trained from scratch on {task} (a fresh {source.get('model_type')} model)"
        card = CardFacts(
            teacher=str(source),
            method=method,
            recipe=getattr(self, "recipe", None),
            metrics=self.last_metrics,
            made_with=made_with(self, self.model),
        )
        export_model(
            self.model,
            self.export_dir,
            getattr(datamodule, "tokenizer", None),
            label_names,
            card=card,
            push_to_hub=self.push_to_hub,
            private=self.private,
            name="fine-tuned model",
        )

    @override
    def configure_callbacks(self) -> list[L.Callback]:
        return default_callbacks(self)

    @override
    def configure_optimizers(self) -> Any:
        return adamw_with_warmup(
            self.model.parameters(),
            self.trainer.estimated_stepping_batches,
            self.learning_rate,
            self.weight_decay,
            eps=self.adam_epsilon,
            warmup_steps=float(self.warmup_ratio),
        )
