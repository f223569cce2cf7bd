"""DistillationModule: a frozen teacher, a student, and the unified objective, as one LightningModule."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from typing_extensions import override

from lightning_kd.batch import complete_batch
from lightning_kd.datamodules.common import task_metrics
from lightning_kd.datamodules.glue_metrics import loss_key
from lightning_kd.distillation.construction import (
    MODEL_CLASSES,
    TEACHER_DTYPES,
    check_arguments,
    check_vocabularies,
    compile_models,
    default_objective,
    load_teacher,
    warn_if_true_half_precision,
)
from lightning_kd.distillation.data_checks import check_models_fit_data, check_task_fits_data
from lightning_kd.distillation.discrepancy import measure_discrepancy
from lightning_kd.distillation.dropout import random_stream
from lightning_kd.distillation.evaluation import PerplexityGap, TeacherComparison, evaluation_key
from lightning_kd.distillation.features import model_features, prepare_batch
from lightning_kd.distillation.resume import check_distillation_resume
from lightning_kd.distillation.step_accounting import StepAccounting
from lightning_kd.distillation.student_export import describe_method, export_student
from lightning_kd.distillation.students import StudentSpec, build_student
from lightning_kd.distillation.teacher_cache import TeacherCache
from lightning_kd.models.info import has_adapter, model_info
from lightning_kd.models.registry import get_adapter
from lightning_kd.objective.objective import DistillationObjective
from lightning_kd.objective.term import Features, KnowledgeTerm
from lightning_kd.pruning.shrink import rebuild_shape_, student_shape
from lightning_kd.training.checkpoints import check_checkpoint_fits, checkpoint_path_of, resuming_fit
from lightning_kd.training.lifecycle import default_callbacks, train_mode_for_fit
from lightning_kd.training.lightning_internals import attached_trainer, logs_this_step
from lightning_kd.training.optimizer import adamw_with_warmup, check_optimizer_settings, check_schedule
from lightning_kd.training.provenance import made_with, run_tokenizer
from lightning_kd.training.run_checks import check_fit_length, check_run
from lightning_kd.training.sharding import configure_sharding
from lightning_kd.training.timing import StepTimer


class DistillationModule(StepAccounting):
    """Distils ``teacher`` into ``student`` with a weighted sum of knowledge terms.

    Args:
        teacher: a Hugging Face model, or a hub name / local folder to load. Frozen, kept in eval mode, run under
            ``no_grad``, and kept out of the optimizer, DDP and checkpoints (a checkpoint records its name).
            A model object given here is used itself, not copied: it is frozen, moved with the module and cast
            by ``teacher_dtype`` in place, so pass ``copy.deepcopy(model)`` to keep the original as it was.
        student: a model, a name / folder, or an init spec (see :mod:`lightning_kd.distillation.students`);
            left out, a copy of the teacher (``{"init": "copy"}``, HomoDistil's start).
        objective: knowledge terms (see :mod:`lightning_kd.objective`); by default the prediction KL where both
            models predict (``loss: mse`` of the scores for one-output regression heads, where a KL is always 0),
            else hidden-state MSE over the uniform layer map.
        task: which head to load named models with: ``base`` (no head), ``masked-lm``, ``sequence-classification``
            (GLUE), ``question-answering`` (SQuAD: start and end logits, distilled as two distributions over the
            window's tokens).
        num_labels: label count when loading a classifier by name whose config does not set it.
        learning_rate, weight_decay, betas, eps: AdamW settings (no decay on biases and norms).
        warmup_steps: linear warm-up length, in steps (int) or as a share of all steps (float < 1).
        schedule: ``linear`` (warm-up then linear decay to 0) or ``constant`` (warm-up then flat).
        teacher_dtype: keep the teacher's weights in ``bfloat16`` or ``float16`` (half its memory and, on a GPU,
            faster); the losses are still computed in float32. ``None`` keeps the loaded dtype. The student's
            precision is the Trainer's (``precision="bf16-mixed"`` runs both models under bf16 autocast).
        compile: ``torch.compile`` the student and the teacher in place at the start of fit: ``True``, or a
            dict of ``torch.compile`` options (``{"mode": "max-autotune"}``, ``{"backend": "aot_eager"}``), where
            ``models`` picks which (``{"models": ["teacher"]}``: the teacher's shapes never change, while a student
            being pruned changes shape at every event and recompiles).
        time_steps: split every step's time into teacher forward, student forward and backward, optimizer,
            pruning and filters, and log it with tokens per second (see :mod:`lightning_kd.training.timing`).
        allow_changes: hyper-parameters that may differ from those of the checkpoint this run resumes (e.g.
            ``["learning_rate"]``); any other difference is refused (see :func:`lightning_kd.training.checkpoints.check_resume`).
        teacher_cache: task-specific distillation on a fixed data set: compute the teacher's outputs once per
            training example and reuse them in later epochs, ``"memory"`` or a folder (kept on disk across runs),
            or ``{"store": ..., "hidden_states": true}`` to keep the hidden states too (much larger; see
            :mod:`lightning_kd.distillation.teacher_cache`).
    """

    def __init__(
        self,
        teacher: str | PreTrainedModel,
        student: StudentSpec | None = None,
        objective: Sequence[Mapping[str, Any]] | None = None,
        task: str = "base",
        num_labels: int | None = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        warmup_steps: int | float = 0,
        schedule: str = "linear",
        teacher_dtype: str | None = None,
        compile: bool | Mapping[str, Any] = False,
        time_steps: bool = True,
        allow_changes: Sequence[str] = (),
        teacher_cache: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_arguments(type(self), task, compile, allow_changes, teacher, num_labels)
        check_schedule(schedule)
        check_optimizer_settings(learning_rate, weight_decay, betas, eps, warmup_steps)
        self.save_hyperparameters(
            ignore=[n for n, v in (("teacher", teacher), ("student", student)) if isinstance(v, nn.Module)]
        )
        teacher_model, self.teacher_source = load_teacher(teacher, task, num_labels, teacher_dtype)
        # Stored outside the module tree: not a parameter (optimizer, DDP), not in state_dict (checkpoints),
        # and not switched to train mode by Lightning. `_apply` below still moves it with the module.
        self.__dict__["teacher"] = teacher_model
        # The student is built before the teacher changes precision: students copied from the teacher's weights
        # (copy, layers, extract) would otherwise inherit its half precision, and so would their AdamW moments.
        self.student = build_student(student, teacher_model, MODEL_CLASSES[task])
        if teacher_dtype is not None:
            teacher_model.to(TEACHER_DTYPES[teacher_dtype])
        self.task_metrics: nn.Module | None = None  # the DataModule's task's (GLUE, SQuAD), set up in setup()
        self.test_metrics: nn.Module | None = None
        self.teacher_comparison = TeacherComparison()
        check_vocabularies(self.teacher, self.student)
        teacher_info, student_info = model_info(self.teacher, "teacher"), model_info(self.student, "student")
        self.objective = DistillationObjective(objective or default_objective(teacher_info, student_info))
        self.objective.bind(teacher_info, student_info)
        needs = self.objective.needs()
        # Hidden states always (the discrepancy reads them); logits whenever both models predict, except causal LMs,
        # whose every position's vocabulary logits only the chunked terms read (from the head's inputs).
        causal = teacher_info.causal and student_info.causal
        self.needs = dataclasses.replace(
            needs,
            hidden_states=True,
            logits=needs.logits or (teacher_info.predicts and student_info.predicts and not causal),
            head_inputs=needs.head_inputs or causal,
        )
        self.perplexity = PerplexityGap() if causal else None
        if self.needs.attentions:
            for model in (self.teacher, self.student):
                get_adapter(model).enable_attention_maps(model)
        self.step_timer: StepTimer | None = StepTimer() if time_steps else None
        self.teacher_cache = TeacherCache.from_spec(teacher_cache)
        self._dropout_rng: dict[str, Any] | None = None
        self.last_terms: dict[str, Tensor] = {}

    # ------------------------------------------------------------------------------------------ set-up

    @override
    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> DistillationModule:
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    @override
    def configure_model(self) -> None:
        configure_sharding(self)  # FSDP2 under lightning_kd.fsdp2() (a ModelParallelStrategy); else nothing

    # ------------------------------------------------------------------------------------------ forward

    def prepare_batch(self, batch: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """The batch with an attention mask, and the positions MLM losses read (see
        :func:`lightning_kd.distillation.features.prepare_batch`)."""
        return prepare_batch(batch, self.needs)

    def teacher_features(self, batch: Mapping[str, Tensor]) -> Features:
        with torch.no_grad():
            return model_features(self.teacher, batch, self.needs, self.needs.teacher_qkv_layers)

    def student_features(self, batch: Mapping[str, Tensor]) -> Features:
        with self._dropout_stream() if self.student.training else nullcontext():
            return model_features(self.student, batch, self.needs, self.needs.student_qkv_layers)

    @contextmanager
    def _dropout_stream(self) -> Iterator[None]:
        # a stream of its own, saved in checkpoints, so a resumed run draws the masks of one that never stopped
        with random_stream(self._dropout_rng, self.device) as state:
            yield
        self._dropout_rng = state

    def _float32(self) -> Any:
        # Under bf16/16-mixed autocast would run the losses' own matmuls (q·k relations, CKA) in half precision,
        # where the KL of two near distributions is rounding noise and can even come out negative.
        if torch.is_autocast_enabled(self.device.type):
            return torch.autocast(self.device.type, enabled=False)
        return nullcontext()

    def losses(
        self, teacher: Features, student: Features, batch: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict]:
        """The objective's loss and its terms, in float32 whatever precision the models ran in."""
        with self._float32():
            return self.objective(teacher.float(), student.float(), batch)

    def measure_discrepancy(self, teacher: Features, student: Features, batch: Mapping[str, Tensor]) -> dict:
        with self._float32():
            return measure_discrepancy(teacher.float(), student.float(), batch)

    @override
    def forward(self, batch: Mapping[str, Tensor]) -> Features:
        return self.student_features(batch)

    @override
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        batch = self.prepare_batch(batch)
        timer = self.step_timer
        with timer.section("teacher_forward") if timer else nullcontext():
            if self.teacher_cache is not None:
                teacher = self.teacher_cache.features(batch, lambda: self.teacher_features(batch))
            else:
                teacher = self.teacher_features(batch)
        with timer.section("student_forward") if timer else nullcontext():
            student = self.student_features(batch)
            loss, terms = self.losses(teacher, student, batch)
        if timer:
            timer.count(batch)
        self.last_terms = terms  # what NonFiniteGuard names when the loss is not finite
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, batch_size=batch_size)  # every step: checkpoint monitors may read it
        # Each value logged costs Lightning's bookkeeping on the host at every step, yet reaches the loggers only on
        # logging steps: the terms and the discrepancy (which costs compute as well) are logged there alone.
        if logs_this_step(self.trainer):
            self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, batch_size=batch_size)
            if teacher.hidden_states is None:  # served from a logits-only cache: the discrepancy reads more
                teacher = self.teacher_features(batch)
            self.log_dict(self.measure_discrepancy(teacher, student, batch), batch_size=batch_size)
        return loss

    # ------------------------------------------------------------------------------------------ fit hooks
    # (the step accounting hooks are StepAccounting's)

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.teacher_cache is not None:
            self.teacher_cache.start(self)

    @override
    def on_train_epoch_end(self) -> None:
        if self.teacher_cache is not None:
            self.log("teacher_cache/hit_rate", self.teacher_cache.hit_rate())
            self.teacher_cache.save()

    @override
    def on_fit_start(self) -> None:
        train_mode_for_fit(self)
        check_fit_length(attached_trainer(self))
        options = self.hparams.get("compile", False)
        if options:
            compile_models({"student": self.student, "teacher": self.teacher}, options)

    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(attached_trainer(self), "datamodule", None)
        check_models_fit_data(datamodule, {"teacher": self.teacher, "student": self.student})
        check_task_fits_data(self.hparams.task, datamodule)
        check_run(self, stage)  # after the callbacks' setup, which adds their terms (TED)
        if stage == "fit":
            warn_if_true_half_precision(str(getattr(attached_trainer(self), "precision", "")))
        # Task-specific distillation: a DataModule with a task (GLUE, SQuAD) brings its official metrics, for the
        # student and, as the bar it is measured against, for the teacher.
        if getattr(datamodule, "task", None) is not None and self.task_metrics is None:
            self.task_metrics = task_metrics(datamodule).to(self.device)
            self.test_metrics = task_metrics(datamodule, prefix="test").to(self.device)
            self.teacher_comparison.add_task(datamodule, self.device)

    @override
    def on_validation_epoch_start(self) -> None:
        self.teacher_comparison.start(evaluation_key(self.trainer, "val"))

    @override
    def on_test_epoch_start(self) -> None:
        self.teacher_comparison.start(evaluation_key(self.trainer, "test"))

    @override
    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self._evaluate(batch, dataloader_idx, "val")

    @override
    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self._evaluate(batch, dataloader_idx, "test")

    def _evaluate(self, batch: Mapping[str, Tensor], dataloader_idx: int, stage: str) -> Tensor:
        batch = self.prepare_batch(batch)
        teacher, student = self.teacher_features(batch), self.student_features(batch)
        loss, terms = self.losses(teacher, student, batch)
        values = {"loss": loss, **terms, **self.measure_discrepancy(teacher, student, batch)}
        self.log_dict(
            {loss_key(self.trainer, stage, k, dataloader_idx): v for k, v in values.items()},
            batch_size=batch["input_ids"].shape[0],
            sync_dist=True,
            add_dataloader_idx=False,
        )
        if self.perplexity is not None and "labels" in batch:
            self.perplexity.update(teacher, student, batch["labels"])
        metrics = self.task_metrics if stage == "val" else self.test_metrics
        if metrics is not None and student.logits is not None:
            metrics.update(student.logits, batch[metrics.target_key], dataloader_idx)
            if teacher.logits is not None:
                self.teacher_comparison.update(stage, teacher.logits, batch, dataloader_idx)
        return loss

    def _end_evaluation(self, stage: str) -> None:
        if self.perplexity is not None and self.perplexity.update_called:
            self.log_dict({f"{stage}/perplexity/{k}": v for k, v in self.perplexity.compute().items()})
            self.perplexity.reset()
        metrics = self.task_metrics if stage == "val" else self.test_metrics
        if metrics is None:
            return
        student = metrics.compute()
        metrics.reset()
        compared = self.teacher_comparison.end(stage, student)
        self.log_dict(student, prog_bar=True)
        self.log_dict(compared)

    @override
    def on_validation_epoch_end(self) -> None:
        self._end_evaluation("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._end_evaluation("test")

    @override
    def predict_step(
        self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """The student's outputs for a test-set batch, with its GLUE indices or SQuAD windows (see
        :class:`~lightning_kd.GLUESubmissionWriter`, :class:`~lightning_kd.SquadPredictionWriter`)."""
        logits = self.student_features(complete_batch(batch)).logits
        if logits is None:
            raise ValueError(
                "predicting needs a student that predicts: distil with task='sequence-classification' "
                "(GLUE) or task='question-answering' (SQuAD)"
            )
        key = "window" if "window" in batch else "idx"
        return {key: batch[key], "logits": logits}

    def evaluation_summary(self) -> list[str]:
        """Lines naming the student's and the teacher's task metrics from the last evaluation, and the gap."""
        return self.teacher_comparison.summary()

    @property
    def teacher_metrics(self) -> nn.ModuleDict:
        """The teacher's task metrics, by stage (see :class:`TeacherComparison`)."""
        return self.teacher_comparison.metrics

    @property
    def teacher_results(self) -> dict[tuple, dict[str, float]]:
        """The teacher's metrics, per evaluation key, computed once each."""
        return self.teacher_comparison.results

    @property
    def last_evaluation(self) -> dict[str, dict[str, float]]:
        """The last evaluation's ``student``, ``teacher`` and ``gap`` metrics."""
        return self.teacher_comparison.last

    @torch.no_grad()
    def discrepancy(self, batches: Sequence[Mapping[str, Tensor]]) -> dict[str, float]:
        """The discrepancy metrics averaged over ``batches``, with the student in eval mode."""
        was_training = self.student.training
        self.student.eval()
        totals: dict[str, float] = {}
        try:
            for batch in batches:
                batch = self.prepare_batch(self.transfer_batch_to_device(batch, self.device, 0))
                values = self.measure_discrepancy(
                    self.teacher_features(batch), self.student_features(batch), batch
                )
                for key, value in values.items():
                    totals[key] = totals.get(key, 0.0) + float(value) / len(batches)
        finally:
            self.student.train(was_training)
        return totals

    # ------------------------------------------------------------------------------------------ optimisation

    @override
    def configure_callbacks(self) -> list[L.Callback]:
        return default_callbacks(self)

    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        return adamw_with_warmup(
            self.parameters(),
            self.trainer.estimated_stepping_batches,
            hp.learning_rate,
            hp.weight_decay,
            tuple(hp.betas),
            hp.eps,
            hp.warmup_steps,
            hp.schedule,
        )

    # ------------------------------------------------------------------------------------------ checkpoints

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lightning_kd"] = {
            "teacher_source": self.teacher_source,
            "teacher_class": type(self.teacher).__name__,
            "dropout_rng": self._dropout_rng,
            # a student shrunk during the run (PruningCallback) is rebuilt to this shape before its weights load
            "student_shape": student_shape(self.student) if has_adapter(self.student) else None,
            "made_with": made_with(self, self.student, self.teacher),  # teacher, tokenizer: checked on resume
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._dropout_rng = checkpoint.get("lightning_kd", {}).get("dropout_rng")
        shape = checkpoint.get("lightning_kd", {}).get("student_shape")
        if shape is not None:
            kept = rebuild_shape_(self.student, shape)
            if kept is not None:
                self.objective.follow_student_width(kept, self.student)
        check_checkpoint_fits(checkpoint, self, "student")
        if resuming_fit(self):
            self._check_resume(checkpoint)

    def _check_resume(self, checkpoint: dict[str, Any]) -> None:
        tokens, path = run_tokenizer(self), checkpoint_path_of(self)
        check_distillation_resume(checkpoint, self.hparams, self.teacher_source, self.teacher, tokens, path)

    def save_student(
        self,
        path: str | os.PathLike,
        tokenizer: Any = None,
        probe: Mapping[str, Tensor] | None = None,
        discrepancy: Mapping[str, tuple[float, float]] | None = None,
    ) -> str:
        """Write the student as a Hugging Face folder that ``AutoModel.from_pretrained`` loads, with the
        tokenizer (by default the DataModule's), the task's label names and a model card (``README.md``), so the
        folder is all a user needs. ``probe``, a batch, times both models' forward pass for the card;
        ``discrepancy`` goes into it as ``{name: (start, end)}``."""
        return export_student(self, path, tokenizer, probe, discrepancy)

    def method_description(self) -> str:
        """What made this student, in one line for its model card: initialisation, objective, callbacks."""
        callbacks = getattr(attached_trainer(self), "callbacks", [])
        return describe_method(self.hparams.get("student"), (t.name for t in self.terms.values()), callbacks)

    @property
    def terms(self) -> Mapping[str, KnowledgeTerm]:
        return self.objective.terms
