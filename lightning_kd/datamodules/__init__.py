"""DataModules: streamed pre-training text and the GLUE tasks."""

from lightning_kd.batch import with_prediction_positions
from lightning_kd.datamodules.common import pin_memory_default
from lightning_kd.datamodules.glue import TASKS, GLUEDataModule, get_task, read_tsv
from lightning_kd.datamodules.pretraining import PretrainingDataModule
from lightning_kd.datamodules.sources import DataSourceError

__all__ = [
    "TASKS",
    "DataSourceError",
    "GLUEDataModule",
    "PretrainingDataModule",
    "get_task",
    "pin_memory_default",
    "read_tsv",
    "with_prediction_positions",
]
