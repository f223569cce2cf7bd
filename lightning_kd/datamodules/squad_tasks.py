"""SQuAD v1.1 and v2.0 as data: files, hub names, and what a model's answers are scored against.

The DataModule that reads them is in ``squad.py``; the official scoring in ``squad_metrics.py``; the search
from start and end logits to answer texts in ``squad_postprocess.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SquadTask:
    name: str  # the task name modules take: squad, squad_v2
    version: str  # v1.1, v2.0
    hub: str  # the hub dataset
    train_file: str  # the official file names
    dev_file: str

    @property
    def version_2(self) -> bool:
        """Whether questions may have no answer (SQuAD 2.0), which the model then says by pointing at CLS."""
        return self.version == "v2.0"

    @property
    def num_labels(self) -> None:
        """No classifier: answers are spans (GLUE tasks give their label count here)."""
        return None


SQUAD_TASKS = {
    "squad": SquadTask("squad", "v1.1", "rajpurkar/squad", "train-v1.1.json", "dev-v1.1.json"),
    "squad_v2": SquadTask("squad_v2", "v2.0", "rajpurkar/squad_v2", "train-v2.0.json", "dev-v2.0.json"),
}
_SPELLINGS = {
    "squad": "squad",
    "v1.1": "squad",
    "1.1": "squad",
    "squadv1.1": "squad",
    "squad_v2": "squad_v2",
    "squadv2": "squad_v2",
    "v2.0": "squad_v2",
    "2.0": "squad_v2",
    "squadv2.0": "squad_v2",
}


def is_squad_task(name: str) -> bool:
    return str(name).strip().lower().replace("-", "_") in _SPELLINGS


def get_squad_task(name: str) -> SquadTask:
    """A SQuAD version by task name (``squad``, ``squad_v2``) or version (``v1.1``, ``v2.0``)."""
    key = str(name).strip().lower().replace("-", "_")
    if key not in _SPELLINGS:
        raise ValueError(
            f"unknown SQuAD version {name!r}: use 'v1.1' (task 'squad') or 'v2.0' (task 'squad_v2', with "
            "unanswerable questions)"
        )
    return SQUAD_TASKS[_SPELLINGS[key]]


@dataclass(frozen=True)
class SquadReference:
    """What a split's windows are scored against: the inputs of
    :func:`~lightning_kd.datamodules.squad_postprocess.postprocess` and the official scores.

    ``window_question``: ``[W]`` int64, each window's question (an index into ``ids``); ``offsets``:
    ``[W, max_length, 2]`` int32, each token's character span in its question's context, ``(-1, -1)`` on the
    question, special tokens and padding; ``answers``: each question's gold texts, ``[]`` when it has none.
    """

    ids: list[str]
    contexts: list[str]
    answers: list[list[str]]
    window_question: torch.Tensor
    offsets: torch.Tensor
    version_2: bool

    @property
    def golds(self) -> dict[str, list[str]]:
        return dict(zip(self.ids, self.answers, strict=True))
