"""DataModules: streamed pre-training text and the GLUE tasks."""

from .common import pin_memory_default, with_prediction_positions
from .glue import TASKS, GLUEDataModule, get_task, read_tsv
from .pretraining import PretrainingDataModule
from .sources import DataSourceError

__all__ = ["TASKS", "DataSourceError", "GLUEDataModule", "PretrainingDataModule", "get_task", "pin_memory_default",
           "read_tsv", "with_prediction_positions"]
