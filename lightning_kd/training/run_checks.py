"""Runs that cannot do what was asked, refused (or, where the run is still sound, named) before the first step.

Each check lives here once; the lightning-kd modules call :func:`check_run` from ``setup`` and
:func:`check_fit_length` from ``on_fit_start``, and :class:`~lightning_kd.datamodules.PretrainingDataModule` calls
:func:`check_run_ends` for its endless stream, so a module of your own on that stream is covered too.

- an objective whose every term weighs 0, or a module with no parameter left to train: the loss is 0 or moves
  nothing, and the run would end with the student it started with;
- a run with no end: an endless stream under an epoch limit (an epoch never ends), or ``max_epochs=-1`` with no
  ``max_steps`` (Lightning's "train forever");
- a ``max_steps`` the data's epochs end before: warned, since Lightning stops at whichever limit comes first and
  the learning-rate schedule already ends there, but the run is shorter than the user may think;
- ``validate``, ``test`` or ``predict`` with no data, or with data of no batches: they would run zero steps, write
  nothing and exit 0 (Lightning's own words for the first, "predict_dataloader must be implemented", say
  nothing of which data a lightning-kd run reads).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Timer

from lightning_kd.training.lightning_internals import attached_trainer, dataloader_source

EVALUATION_STAGES = ("validate", "test", "predict")
# what each evaluation reads, and where a lightning-kd DataModule gets it
_READS = {
    "validate": (
        "validation data",
        "GLUEDataModule and SQuADDataModule validate on their dev sets; PretrainingDataModule on its val_sources "
        "(e.g. val_sources: [{name: docstrings, split: validation}])",
    ),
    "test": (
        "test data",
        "GLUEDataModule and SQuADDataModule test on their labeled dev sets; a PretrainingDataModule has no test "
        "set: run `validate` with val_sources instead",
    ),
    "predict": (
        "data to predict",
        "predict labels a task's unlabeled test sets: use GLUEDataModule (with the task's test files) or "
        "SQuADDataModule; a PretrainingDataModule has nothing to label",
    ),
}


def check_run(module: L.LightningModule, stage: str) -> None:
    """The checks that can be made in ``setup``: what ``fit`` trains and whether it ends, or whether an
    evaluation has anything to read."""
    trainer = attached_trainer(module)
    if trainer is None:
        return
    stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn, a str enum
    if stage == "fit":
        check_something_to_train(module)
        check_run_ends(trainer, endless=False)
    elif stage in EVALUATION_STAGES:
        check_evaluation_data(trainer, stage)


def check_something_to_train(module: L.LightningModule) -> None:
    """Refuse an objective whose terms all weigh 0, and a module whose parameters are all frozen."""
    objective = getattr(module, "objective", None)
    terms: Mapping[str, Any] = getattr(objective, "terms", None) or {}
    if terms and not any(float(getattr(term, "weight", 1.0)) > 0 for term in terms.values()):
        weights = ", ".join(f"{name}: {float(term.weight):g}" for name, term in terms.items())
        raise ValueError(
            f"every term of the objective weighs 0 ({weights}), so the loss is 0 and training would not change "
            "the student: give at least one term a weight > 0 (weight: 1.0 is the default)."
        )
    if not any(p.requires_grad for p in module.parameters()):
        raise ValueError(
            f"{type(module).__name__} has no parameter to train (every one has requires_grad=False), so training "
            "would change nothing: unfreeze the student (student.requires_grad_(True)) or what it should learn."
        )


def _has_timer(trainer: L.Trainer) -> bool:
    return any(isinstance(c, Timer) for c in trainer.callbacks)


def check_run_ends(trainer: L.Trainer, endless: bool) -> None:
    """Refuse a run that never stops: ``endless`` data (a stream that repeats, so an epoch never ends) with no
    step limit, or ``max_epochs=-1`` with no ``max_steps``. ``max_time`` (a Timer) and an integer
    ``limit_train_batches`` (which ends each epoch) are limits too."""
    if trainer.max_steps != -1 or _has_timer(trainer):
        return
    if endless and not isinstance(trainer.limit_train_batches, int):
        raise ValueError(
            f"the training stream repeats forever (repeat=True), so an epoch never ends and max_epochs="
            f"{trainer.max_epochs} can never stop the run: set trainer.max_steps (the usual for pre-training), "
            "or repeat=False to end each epoch after one pass over the sources."
        )
    if trainer.max_epochs == -1:
        raise ValueError(
            "max_epochs=-1 trains without an epoch limit, and no max_steps is set, so the run would never end: "
            "set trainer.max_steps, or a number of epochs (max_epochs)."
        )


def check_fit_length(trainer: L.Trainer | None) -> None:
    """Warn when the epochs end the run before ``max_steps``: Lightning stops at whichever comes first, so the
    user gets fewer steps than ``max_steps`` says (the learning-rate schedule and a pruning schedule end there).
    Without a Trainer (a module's hooks called by hand) there is no run to check."""
    if trainer is None:
        return
    batches, epochs = trainer.num_training_batches, trainer.max_epochs
    if trainer.max_steps == -1 or epochs is None or epochs < 0 or not math.isfinite(batches):
        return
    last = math.ceil(batches / trainer.accumulate_grad_batches) * max(epochs, 1)
    if last < trainer.max_steps:
        warnings.warn(
            f"the run ends after max_epochs={epochs} epochs of {int(batches)} batches, at optimizer step {last}, "
            f"before trainer.max_steps={trainer.max_steps}: Lightning stops at whichever limit comes first, and "
            "the learning-rate schedule ends at that step. Set max_epochs=-1 to train for max_steps, or lower "
            "max_steps to say what runs.",
            stacklevel=2,
        )


def check_evaluation_data(trainer: L.Trainer, stage: str) -> None:
    """Refuse ``validate``, ``test`` or ``predict`` with no data, or with loaders that hold no batch."""
    what, fix = _READS[stage]
    source = dataloader_source(trainer, stage)
    where = type(source.instance).__name__ if source.is_module() else "the dataloaders given"
    if not source.is_defined():
        raise ValueError(f"`{stage}` has nothing to read: {where} has no {what}. {fix}.")
    loaders = _flatten(source.dataloader())
    if not loaders:  # e.g. a PretrainingDataModule without val_sources
        raise ValueError(
            f"`{stage}` has nothing to read: {where} gives no {what}, so it would run zero steps and write "
            f"nothing. {fix}."
        )
    if all(_batches(loader) == 0 for loader in loaders):
        raise ValueError(
            f"`{stage}` has nothing to read: the {what} of {where} holds no example, so it would run zero steps "
            "and write nothing: check the files it reads (data_dir, predict_file, val_sources) hold examples, "
            "or pass loaders that do."
        )


def _flatten(loaders: Any) -> list[Any]:
    if loaders is None:
        return []
    if isinstance(loaders, Mapping):
        return [x for value in loaders.values() for x in _flatten(value)]
    if isinstance(loaders, (list, tuple)):
        return [x for value in loaders for x in _flatten(value)]
    return [loaders]


def _batches(loader: Any) -> int | None:
    """The number of batches, or None where it cannot be known without reading (an iterable stream)."""
    try:
        return len(loader)
    except TypeError:
        return None
