"""DataModules: streamed pre-training text and the GLUE tasks."""

from .glue import TASKS, GLUEDataModule, get_task, read_tsv
from .pretraining import PretrainingDataModule
from .sources import DataSourceError

__all__ = ["TASKS", "DataSourceError", "GLUEDataModule", "PretrainingDataModule", "get_task", "read_tsv"]
