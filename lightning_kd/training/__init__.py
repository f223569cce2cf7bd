"""What a Lightning run needs around the models: optimizer and schedule, checkpoints and resume, distributed
strategies (DDP with compressed gradients; FSDP2 in ``sharding.py``, and the surgery that reshapes a sharded
student in ``sharded_surgery.py``), one W&B run and CSV history across resumes (``logged_run.py``), what
artifacts record they were made from (``provenance.py``), step timing, the train-mode lifecycle, exported
folders, their model cards and their scores on lm-evaluation-harness tasks (``harness.py``, the optional
``harness`` extra), and the one module that touches Lightning's private API (``lightning_internals.py``)."""

from lightning_kd.training.checkpoints import AtomicCheckpointIO, check_resume
from lightning_kd.training.distributed import compressed_ddp
from lightning_kd.training.harness import evaluate_with_harness
from lightning_kd.training.logged_run import continue_logged_run
from lightning_kd.training.optimizer import adamw_with_warmup
from lightning_kd.training.sharding import FSDP2Strategy, fsdp2
from lightning_kd.training.timing import StepTimer, timed

__all__ = [
    "AtomicCheckpointIO",
    "FSDP2Strategy",
    "StepTimer",
    "adamw_with_warmup",
    "check_resume",
    "compressed_ddp",
    "continue_logged_run",
    "evaluate_with_harness",
    "fsdp2",
    "timed",
]
