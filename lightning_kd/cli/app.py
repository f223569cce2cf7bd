"""DistillationCLI: LightningCLI over any lightning-kd module and DataModule, completed with the run's logging,
atomic checkpoints and preemption handling."""

from __future__ import annotations

import importlib
import logging
import os
import re
import warnings
from collections.abc import Iterable
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint, ModelSummary
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from typing_extensions import override

from lightning_kd.callbacks.dashboard import RunDashboard
from lightning_kd.callbacks.preemption import PreemptionCheckpoint
from lightning_kd.callbacks.progress import step_progress_bar
from lightning_kd.callbacks.report import DistillationReport, ModelSize
from lightning_kd.callbacks.submission import GLUESubmissionWriter, SquadPredictionWriter
from lightning_kd.cli.recipe import RecipeConfigCallback, finish_wandb_runs, name_wandb_runs
from lightning_kd.datamodules.glue import GLUEDataModule
from lightning_kd.datamodules.squad_tasks import SquadTask
from lightning_kd.training.checkpoints import check_readable, install_atomic_checkpoints
from lightning_kd.training.lightning_internals import cluster_environment
from lightning_kd.training.logged_run import continue_logged_run

log = logging.getLogger(__name__)

EVALUATIONS = ("validate", "test", "predict")
AS_BUILT = "none"  # --ckpt_path none: evaluate the weights the recipe builds, on purpose
BUILT_WEIGHTS = {
    "distillation": "the student as the recipe builds it (its init, not distilled)",
    "fine-tuning": "the model as the recipe loads it (not fine-tuned by this recipe)",
}
WANDB_SETTINGS = ("WANDB_PROJECT", "WANDB_API_KEY", "WANDB_MODE")
CKPT_PATH_WORDS = ("last", "best", "hpc")  # resolved by Lightning, not paths
NO_VAL_LOADER_WARNING = "You defined a `validation_step` but have no `val_dataloader`"
# Lightning's advertisements for its cloud services, logged at every fit
LIGHTNING_TIP = "💡 Tip:"
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class DistillationCLI(LightningCLI):
    """LightningCLI with the model and data chosen by ``class_path`` in the recipe.

    Before fit it makes checkpoint writes atomic (:class:`~lightning_kd.training.checkpoints.AtomicCheckpointIO`, unless
    the recipe chose a checkpoint plugin), completes the recipe's logging (a CSVLogger when the recipe logs but
    not to CSV, a WandbLogger when ``WANDB_*`` is set, and a :class:`~lightning_kd.RunDashboard` with W&B panels
    and summaries, the pruning events table and a summary PNG next to ``metrics.csv``), and under SLURM adds a
    :class:`~lightning_kd.PreemptionCheckpoint`; each unless the recipe has its own.

    What it prints is for the person who ran it: the sizes (:class:`~lightning_kd.DistillationReport`'s lines,
    or a :class:`~lightning_kd.callbacks.report.ModelSize` line) instead of Lightning's model summary, whose
    FLOPs read 0 (a recipe may still ask for it, ``enable_model_summary: true``), a progress bar that counts steps
    when ``max_steps`` bounds the run, and none of Lightning's warnings that misread lightning-kd's own parts or
    its advertisements (``💡 Tip``).
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", RecipeConfigCallback)
        # Lightning's summary table has a FLOPs column that reads 0 unless the module has an example input;
        # the sizes come from DistillationReport or ModelSize instead (see before_fit).
        kwargs["trainer_defaults"] = {"enable_model_summary": False, **(kwargs.get("trainer_defaults") or {})}
        _hide_lightning_tips()
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            **kwargs,
        )

    @override
    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The recipe's Trainer, with a progress bar that counts steps in a step-bounded run
        (:func:`~lightning_kd.callbacks.progress.step_progress_bar`) in place of Lightning's default bar, unless
        the recipe has a bar of its own or none (``enable_progress_bar: false``). Decided before the Trainer
        exists: once built, Lightning's default bar cannot be told from one the recipe named."""
        config = self._get(self.config_init, "trainer", default={}) or {}
        callbacks = _as_list(kwargs.get("callbacks", config.get("callbacks")))
        given = [*callbacks, *_as_list(self.trainer_defaults.get("callbacks"))]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in given
        ):
            kwargs["callbacks"] = [*callbacks, step_progress_bar()]
        return super().instantiate_trainer(**kwargs)

    @override
    def _parse_ckpt_path(self) -> None:
        """Leave the recipe and the command line as written when resuming.

        LightningCLI lays the checkpoint's hyper-parameters over them, so ``--ckpt_path ... --model.init_args.
        learning_rate 1e-5`` would silently run with the checkpoint's rate. Here the module is built as the user
        wrote it and compares itself with the checkpoint when it loads (:func:`check_resume`: differences are
        refused unless ``allow_changes`` names them), the policy a Python user gets too. A checkpoint that cannot
        be read is reported by its path before anything is built.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if subcommand in EVALUATIONS:
            log.info(evaluated_weights(subcommand, ckpt_path, self.config[subcommand].get("model")))
            if _as_built(ckpt_path):
                return
        if ckpt_path and str(ckpt_path) not in CKPT_PATH_WORDS and not str(ckpt_path).startswith("registry"):
            check_readable(ckpt_path)

    @override
    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if _as_built(kwargs.get("ckpt_path")):
            kwargs["ckpt_path"] = None  # --ckpt_path none: the weights as the recipe builds them
        return kwargs

    def before_fit(self) -> None:
        install_atomic_checkpoints(self.trainer)
        add_csv_when_missing(self.trainer)
        add_wandb_when_configured(self.trainer)
        config = self.config[self.subcommand] if self.subcommand else self.config
        name_wandb_runs(self.trainer, [str(f) for f in config.get("config") or [] if f])
        add_dashboard_when_missing(self.trainer)
        add_preemption_checkpoint_under_slurm(self.trainer)
        add_model_size_when_missing(self.trainer)

    def fit(self, model: L.LightningModule, **kwargs: Any) -> None:
        """``Trainer.fit``, continuing the W&B run and CSV history of the checkpoint it resumes from
        (:func:`~lightning_kd.training.logged_run.continue_logged_run`), without Lightning's warning that the module's ``validation_step`` has no
        ``val_dataloader`` when that validation_step is lightning-kd's: it evaluates task data when the
        DataModule has some (GLUE) and is not for a pre-training stream, which has none by design. A
        ``validation_step`` the user wrote keeps the warning."""
        with warnings.catch_warnings():
            if type(model).validation_step.__module__.startswith("lightning_kd."):
                warnings.filterwarnings(
                    "ignore", message=re.escape(NO_VAL_LOADER_WARNING), category=PossibleUserWarning
                )
            # after before_fit has added the loggers, before fit starts them: a resumed fit continues their run
            continue_logged_run(self.trainer, kwargs.get("ckpt_path"))
            self.trainer.fit(model, **kwargs)

    def after_fit(self) -> None:
        finish_wandb_runs(self.trainer)

    def before_predict(self) -> None:
        add_prediction_writer(self.trainer, self.datamodule)


def _as_built(ckpt_path: object) -> bool:
    return isinstance(ckpt_path, str) and ckpt_path.lower() == AS_BUILT


def evaluated_weights(subcommand: str, ckpt_path: object, model: Any) -> str:
    """The line saying which weights ``validate``, ``test`` or ``predict`` evaluates; without a checkpoint, for a
    distillation or fine-tuning recipe, an error unless ``--ckpt_path none`` asks for the weights as built.

    Without ``--ckpt_path`` Lightning evaluates the module as the recipe builds it: the student before any
    distillation, the model before fine-tuning, whose results would read as the run's.
    """
    if ckpt_path is not None and not _as_built(ckpt_path):
        return f"lightning-kd {subcommand}: evaluating the weights of checkpoint {ckpt_path}"
    class_path = str(model.get("class_path", "")) if hasattr(model, "get") else type(model).__name__
    name = class_path.rsplit(".", 1)[-1]
    built = BUILT_WEIGHTS.get(_trained_kind(class_path) or "", "the module as the recipe builds it")
    line = f"lightning-kd {subcommand}: evaluating {built} ({name}), before any training: no checkpoint is loaded"
    if ckpt_path is None and _trained_kind(class_path):
        raise ValueError(
            f"`lightning-kd {subcommand}` without --ckpt_path would evaluate {built}, before any training, and "
            f"report it as this recipe's result. Pass the checkpoint to evaluate: --ckpt_path <file.ckpt>, or "
            f"--ckpt_path last (the newest in the run's folder) or best; or --ckpt_path {AS_BUILT} to evaluate the "
            "weights as built, e.g. a teacher loaded already fine-tuned."
        )
    return line + (f" (--ckpt_path {AS_BUILT})" if ckpt_path is not None else "")


def _trained_kind(class_path: str) -> str | None:
    """``distillation`` or ``fine-tuning`` when ``class_path`` is (a subclass of) a lightning-kd module that
    trains its weights, else None."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError):
        return None
    from lightning_kd.distillation.module import DistillationModule
    from lightning_kd.finetuning.module import FineTuningModule

    if isinstance(cls, type) and issubclass(cls, DistillationModule):
        return "distillation"
    if isinstance(cls, type) and issubclass(cls, FineTuningModule):
        return "fine-tuning"
    return None


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LIGHTNING_TIP)


def _hide_lightning_tips() -> None:
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())


def add_model_size_when_missing(trainer: L.Trainer) -> None:
    """Print the model's size when fit starts (:class:`~lightning_kd.callbacks.report.ModelSize`) unless the
    recipe's DistillationReport prints it or the recipe asked for Lightning's model summary."""
    if any(isinstance(c, (DistillationReport, ModelSize, ModelSummary)) for c in trainer.callbacks):
        return
    trainer.callbacks.insert(0, ModelSize())


def _as_list(callbacks: object) -> list[L.Callback]:
    if callbacks is None:
        return []
    return list(callbacks) if isinstance(callbacks, Iterable) else [callbacks]  # type: ignore[list-item]


def add_csv_when_missing(trainer: L.Trainer) -> None:
    """Keep the metrics in a CSV file too, so every run has them on disk and RunDashboard can draw them.

    ``trainer.logger: false`` (no loggers at all) is left alone: that recipe asked for no files. The CSV goes to
    ``<default_root_dir>/csv``, after the recipe's loggers, so checkpoints keep the folder of the first logger.
    """
    if not trainer.loggers or any(isinstance(logger, CSVLogger) for logger in trainer.loggers):
        return
    trainer.loggers = [*trainer.loggers, CSVLogger(save_dir=trainer.default_root_dir, name="csv")]


def add_dashboard_when_missing(trainer: L.Trainer) -> None:
    """Add a RunDashboard unless the recipe configured one; without a CSVLogger (``logger: false``) it draws no
    summary plot.

    It goes after the recipe's other callbacks, so it sees what they log in the same hook, and before the
    checkpoint callbacks, which Lightning keeps last.
    """
    if any(isinstance(callback, RunDashboard) for callback in trainer.callbacks):
        return
    has_csv = any(isinstance(logger, CSVLogger) for logger in trainer.loggers)
    _insert_before_checkpoints(trainer, RunDashboard() if has_csv else RunDashboard(plot=None))


def _insert_before_checkpoints(trainer: L.Trainer, callback: L.Callback) -> None:
    # after the recipe's callbacks, so it sees what they did in the same hook; Lightning keeps checkpoints last
    callbacks = trainer.callbacks
    first_checkpoint = next((i for i, c in enumerate(callbacks) if isinstance(c, Checkpoint)), len(callbacks))
    callbacks.insert(first_checkpoint, callback)


def add_preemption_checkpoint_under_slurm(trainer: L.Trainer) -> None:
    """Under SLURM, checkpoint and requeue on the job's warning signal (see :class:`PreemptionCheckpoint`),
    unless the recipe has one. It goes after every other callback but the checkpoint ones, so its checkpoint
    holds what they did at the same step (a pruning event)."""
    if not SLURMEnvironment.detect() or any(isinstance(c, PreemptionCheckpoint) for c in trainer.callbacks):
        return
    environment = cluster_environment(trainer)
    name = environment.requeue_signal.name if isinstance(environment, SLURMEnvironment) else "SIGUSR1"
    _insert_before_checkpoints(trainer, PreemptionCheckpoint(signal_name=name))


def add_prediction_writer(trainer: L.Trainer, datamodule: object) -> None:
    """``lightning-kd predict`` on a GLUE task writes the submission folder to ``<default_root_dir>/glue_submission``
    (see :class:`~lightning_kd.GLUESubmissionWriter`), and on SQuAD the official scripts' ``predictions.json``
    (and ``null_odds.json``) to ``<default_root_dir>/squad_predictions`` (see
    :class:`~lightning_kd.SquadPredictionWriter`), unless the recipe has a writer of its own."""
    if any(isinstance(c, (GLUESubmissionWriter, SquadPredictionWriter)) for c in trainer.callbacks):
        return
    if isinstance(datamodule, GLUEDataModule):
        trainer.callbacks.append(
            GLUESubmissionWriter(os.path.join(trainer.default_root_dir, "glue_submission"))
        )
    elif isinstance(getattr(datamodule, "task", None), SquadTask):
        trainer.callbacks.append(
            SquadPredictionWriter(os.path.join(trainer.default_root_dir, "squad_predictions"))
        )


def add_wandb_when_configured(trainer: L.Trainer) -> None:
    """Log to W&B as well when the environment asks for it, so recipes need not name a W&B logger.

    ``WANDB_MODE=offline`` writes a run folder with no network; ``wandb sync`` uploads it later;
    ``WANDB_MODE=disabled`` adds nothing.
    """
    if not any(os.environ.get(name) for name in WANDB_SETTINGS) or os.environ.get("WANDB_MODE") == "disabled":
        return
    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        return
    wandb = WandbLogger(
        project=os.environ.get("WANDB_PROJECT", "lightning-kd"), save_dir=trainer.default_root_dir
    )
    trainer.loggers = [*trainer.loggers, wandb]
