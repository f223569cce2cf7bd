"""lightning-kd: knowledge distillation and structured pruning of transformers as PyTorch Lightning parts.

Where each paper lives:

- KD revisited (Lu et al., 2022), the unified objective: ``lightning_kd/objective/``, run by
  ``lightning_kd/distillation/`` (``DistillationModule``)
- HomoDistil (Liang et al., ICLR 2023): ``lightning_kd/pruning/`` (``PruningCallback``)
- ETD, Extract Then Distill (Chen et al., ICANN 2021): ``lightning_kd/pruning/extract.py`` (``extract``)
- TED (Liang et al., ICML 2023): ``lightning_kd/ted/`` (``TEDFilterCallback``)

What knows a model's insides is ``lightning_kd/models/``, one adapter per architecture; the package map is in
``docs/architecture.md``.

The public names below load on first use, so ``import lightning_kd`` (and ``lightning-kd --help``) stays cheap:
torch, Lightning and transformers are imported by the part that needs them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
import warnings
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a record is emitted (a test's capture, a notebook's cell)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


# What the library tells a user (sizes, where a student was saved, the end-of-fit report) goes through the
# "lightning_kd" logger at INFO. As Lightning does for its own logger: shown on stdout unless the application
# configured logging itself, in which case its handlers decide.
_log = logging.getLogger(__name__)
if not logging.getLogger().hasHandlers() and not _log.handlers:
    _log.setLevel(logging.INFO)
    _log.addHandler(_StdoutHandler())
    _log.propagate = False

# public name -> the module that defines it
_PUBLIC = {
    "AtomicCheckpointIO": "lightning_kd.training.checkpoints",
    "DistillationModule": "lightning_kd.distillation.module",
    "DistillationObjective": "lightning_kd.objective.objective",
    "DistillationReport": "lightning_kd.callbacks.report",
    "FineTuningModule": "lightning_kd.finetuning.module",
    "GLUEDataModule": "lightning_kd.datamodules.glue",
    "GLUESubmissionWriter": "lightning_kd.callbacks.submission",
    "KnowledgeTerm": "lightning_kd.objective.term",
    "NonFiniteError": "lightning_kd.callbacks.nonfinite",
    "NonFiniteGuard": "lightning_kd.callbacks.nonfinite",
    "PreemptionCheckpoint": "lightning_kd.callbacks.preemption",
    "PretrainingDataModule": "lightning_kd.datamodules.pretraining",
    "PruningCallback": "lightning_kd.pruning.callback",
    "RunDashboard": "lightning_kd.callbacks.dashboard",
    "SQuADDataModule": "lightning_kd.datamodules.squad",
    "SquadPredictionWriter": "lightning_kd.callbacks.submission",
    "TEDFilterCallback": "lightning_kd.ted.callback",
    "answer_questions": "lightning_kd.datamodules.squad_answer",
    "build_student": "lightning_kd.distillation.students",
    "export_pretrained": "lightning_kd.pruning.export",
    "extract": "lightning_kd.pruning.extract",
    "load_pruned": "lightning_kd.pruning.export",
    "prune_model": "lightning_kd.pruning.prune",
    "register_student_init": "lightning_kd.distillation.students",
    "register_term": "lightning_kd.objective.term",
    "score_units": "lightning_kd.pruning.importance",
}
__all__ = [
    "AtomicCheckpointIO",
    "DistillationModule",
    "DistillationObjective",
    "DistillationReport",
    "FineTuningModule",
    "GLUEDataModule",
    "GLUESubmissionWriter",
    "KnowledgeTerm",
    "NonFiniteError",
    "NonFiniteGuard",
    "PreemptionCheckpoint",
    "PretrainingDataModule",
    "PruningCallback",
    "RunDashboard",
    "SQuADDataModule",
    "SquadPredictionWriter",
    "TEDFilterCallback",
    "answer_questions",
    "build_student",
    "export_pretrained",
    "extract",
    "load_pruned",
    "prune_model",
    "register_student_init",
    "register_term",
    "score_units",
]

# Modules that moved when the packages were laid out by concept (0.1 -> 0.2): old path -> new path. Old paths
# keep working (recipes name classes by module path), with a warning naming the new one.
MOVED_MODULES = {
    "lightning_kd.module": "lightning_kd.distillation.module",
    "lightning_kd.students": "lightning_kd.distillation.students",
    "lightning_kd.teacher_cache": "lightning_kd.distillation.teacher_cache",
    "lightning_kd.discrepancy": "lightning_kd.distillation.discrepancy",
    "lightning_kd.inputs": "lightning_kd.distillation.data_checks",
    "lightning_kd.finetune": "lightning_kd.finetuning.module",
    "lightning_kd.evaluation": "lightning_kd.datamodules.glue_metrics",
    "lightning_kd.checkpointing": "lightning_kd.training.checkpoints",
    "lightning_kd.distributed": "lightning_kd.training.distributed",
    "lightning_kd.timing": "lightning_kd.training.timing",
    "lightning_kd.train_mode": "lightning_kd.training.lifecycle",
    "lightning_kd.optim": "lightning_kd.training.optimizer",
    "lightning_kd.run_config": "lightning_kd.cli.recipe",
    "lightning_kd.ted_filters": "lightning_kd.ted.filters",
    "lightning_kd.objective.ted": "lightning_kd.ted.terms",
    "lightning_kd.callbacks.ted": "lightning_kd.ted.callback",
    "lightning_kd.callbacks.pruning": "lightning_kd.pruning.callback",
    "lightning_kd.objective.base": "lightning_kd.objective.term",
    "lightning_kd.objective.core": "lightning_kd.objective.objective",
    "lightning_kd.models.units": "lightning_kd.pruning.units",
    "lightning_kd.models.importance": "lightning_kd.pruning.importance",
    "lightning_kd.models.prune": "lightning_kd.pruning.prune",
    "lightning_kd.models.shrink": "lightning_kd.pruning.shrink",
    "lightning_kd.models.extract": "lightning_kd.pruning.extract",
    "lightning_kd.models.export": "lightning_kd.pruning.export",
    "lightning_kd.models.card": "lightning_kd.training.card",
    "lightning_kd.models.base": "lightning_kd.models.adapter",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves an old module path as the module that now lives at the new one (the same object)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: Any) -> Any:
        new = MOVED_MODULES[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; import it (or name it in a recipe's class_path) from there.",
            FutureWarning,
            stacklevel=2,
        )
        module = importlib.import_module(new)
        sys.modules[spec.name] = module
        return module

    def exec_module(self, module: Any) -> None:
        return None


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_kd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:
    from lightning_kd.callbacks.dashboard import RunDashboard
    from lightning_kd.callbacks.nonfinite import NonFiniteError, NonFiniteGuard
    from lightning_kd.callbacks.preemption import PreemptionCheckpoint
    from lightning_kd.callbacks.report import DistillationReport
    from lightning_kd.callbacks.submission import GLUESubmissionWriter, SquadPredictionWriter
    from lightning_kd.datamodules.glue import GLUEDataModule
    from lightning_kd.datamodules.pretraining import PretrainingDataModule
    from lightning_kd.datamodules.squad import SQuADDataModule
    from lightning_kd.datamodules.squad_answer import answer_questions
    from lightning_kd.distillation.module import DistillationModule
    from lightning_kd.distillation.students import build_student, register_student_init
    from lightning_kd.finetuning.module import FineTuningModule
    from lightning_kd.objective.objective import DistillationObjective
    from lightning_kd.objective.term import KnowledgeTerm, register_term
    from lightning_kd.pruning.callback import PruningCallback
    from lightning_kd.pruning.export import export_pretrained, load_pruned
    from lightning_kd.pruning.extract import extract
    from lightning_kd.pruning.importance import score_units
    from lightning_kd.pruning.prune import prune_model
    from lightning_kd.ted.callback import TEDFilterCallback
    from lightning_kd.training.checkpoints import AtomicCheckpointIO
