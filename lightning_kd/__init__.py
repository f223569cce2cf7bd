"""lightning-kd: knowledge distillation of transformers as PyTorch Lightning parts.

Where each paper lives:
- KD revisited (Lu et al., 2022), the unified objective: ``lightning_kd/objective/``
- HomoDistil (Liang et al., ICLR 2023): ``lightning_kd/callbacks/pruning.py``
- ETD, Extract Then Distill (Chen et al., ICANN 2021): ``lightning_kd/models/extract.py``
- TED (Liang et al., ICML 2023): ``lightning_kd/callbacks/ted.py``
"""

from .callbacks import (
    DistillationReport,
    GLUESubmissionWriter,
    NonFiniteError,
    NonFiniteGuard,
    PreemptionCheckpoint,
    PruningCallback,
    RunDashboard,
    TEDFilterCallback,
)
from .checkpointing import AtomicCheckpointIO
from .datamodules import GLUEDataModule, PretrainingDataModule
from .finetune import FineTuningModule
from .models import export_pretrained, extract, load_pruned, prune_model, score_units
from .module import DistillationModule
from .objective import DistillationObjective, KnowledgeTerm, register_term
from .students import build_student, register_student_init

__version__ = "0.1.0"

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
    "TEDFilterCallback",
    "build_student",
    "export_pretrained",
    "extract",
    "load_pruned",
    "prune_model",
    "register_student_init",
    "register_term",
    "score_units",
]
