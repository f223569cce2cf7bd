"""DataModules: streamed pre-training text, the GLUE tasks and SQuAD."""

from lightning_kd.batch import with_prediction_positions
from lightning_kd.datamodules.common import pin_memory_default
from lightning_kd.datamodules.glue import TASKS, GLUEDataModule, get_task, read_tsv
from lightning_kd.datamodules.pretraining import PretrainingDataModule
from lightning_kd.datamodules.sources import DataSourceError
from lightning_kd.datamodules.squad import SQuADDataModule
from lightning_kd.datamodules.squad_tasks import SquadReference, SquadTask, get_squad_task

__all__ = [
    "TASKS",
    "DataSourceError",
    "GLUEDataModule",
    "PretrainingDataModule",
    "SQuADDataModule",
    "SquadReference",
    "SquadTask",
    "get_squad_task",
    "get_task",
    "pin_memory_default",
    "read_tsv",
    "with_prediction_positions",
]
