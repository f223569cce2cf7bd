"""Writing a trained model out as a folder a user can ship: the model, its tokenizer, the task's label names, a
model card, and, when asked, the hub upload. One sequence for the distilled student and the fine-tuned model."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from lightning_kd.files import atomic_folder
from lightning_kd.hub import push_folder
from lightning_kd.pruning.export import WEIGHT_FILES, check_export_written, parameter_count, save_standard
from lightning_kd.training.card import auto_class_name, export_sizes_line, write_model_card

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CardFacts:
    """What the model card says that the export itself does not know (its sizes, Auto class and label names
    it fills in); see :func:`lightning_kd.training.card.write_model_card` for each field."""

    teacher: str
    method: str
    recipe: str | None = None
    teacher_parameters: int | None = None
    speed: Mapping[str, Any] | None = None
    metrics: Mapping[str, float] | None = None
    discrepancy: Mapping[str, tuple[float, float]] | None = None
    made_with: Mapping[str, Any] | None = None


def write_model_folder(
    model: nn.Module, path: str | os.PathLike, tokenizer: Any = None, label_names: Sequence[str] | None = None
) -> tuple[int, int]:
    """Save ``model`` (and ``tokenizer``) to ``path`` and check both landed; returns (its parameters, those
    plain transformers loads).

    A model that is no ``PreTrainedModel`` but saves itself (``save_pretrained``) is saved so, at its own size.
    The folder is written aside and moved into place once complete (:func:`~lightning_kd.files.atomic_folder`):
    a full disk leaves an earlier export at ``path`` whole, and is raised naming the disk.
    """
    with atomic_folder(path, "model folder", replaces=WEIGHT_FILES) as staging:
        if not isinstance(model, PreTrainedModel) and callable(getattr(model, "save_pretrained", None)):
            model.save_pretrained(staging)
            sizes = (parameter_count(model),) * 2
        else:
            sizes = save_standard(model, staging, label_names or None)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        check_export_written(staging)
    return sizes


def export_model(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    label_names: Sequence[str] | None = None,
    *,
    card: CardFacts | Callable[[], CardFacts],
    rescue_root: str | os.PathLike | None = None,
    log_sizes: bool = False,
    push_to_hub: str | None = None,
    private: bool = True,
    name: str = "model",
) -> tuple[int, int]:
    """Write ``model`` to ``path`` with its tokenizer, label names and model card; returns its two sizes (see
    :func:`write_model_folder`).

    ``card`` may be a function, called once the folder is written, so that a slow or failing measurement
    (a forward-pass timing, say) never costs the saved model. With ``rescue_root``, a save that fails with
    ``OSError`` writes the model to a ``<name>-rescued-<time>`` folder there instead and raises, naming both
    folders: the run's work is in memory only. ``log_sizes`` logs both sizes in one line;
    ``push_to_hub`` uploads the folder to that repo and prints ``<name> pushed to <url>``.
    """
    try:
        parameters, plain = write_model_folder(model, path, tokenizer, label_names)
    except OSError as error:
        if rescue_root is None:
            raise
        folder = f"{name.replace(' ', '-')}-rescued-{time.strftime('%Y%m%d-%H%M%S')}"
        rescue = Path(rescue_root) / folder
        try:
            write_model_folder(model, rescue, tokenizer, label_names)
        except OSError as second:
            raise OSError(
                f"could not save the {name} to {path} ({error}), nor to {rescue} ({second}); the trained "
                "weights were only in memory. Free space or name a writable export folder before the next run."
            ) from error
        raise OSError(
            f"could not save the {name} to {path} ({error}); it was saved to {rescue.resolve()} instead."
        ) from error
    facts = card() if callable(card) else card
    write_model_card(
        path,
        teacher=facts.teacher,
        method=facts.method,
        recipe=facts.recipe,
        model_class=auto_class_name(model),
        parameters=parameters,
        plain_parameters=plain,
        teacher_parameters=facts.teacher_parameters,
        speed=facts.speed,
        discrepancy=facts.discrepancy,
        metrics=facts.metrics,
        label_names=list(label_names) if label_names else None,
        made_with=facts.made_with,
    )
    if log_sizes:
        log.info(export_sizes_line(parameters, plain))
    if push_to_hub:
        log.info(f"{name} pushed to {push_folder(path, push_to_hub, private)}")
    return parameters, plain
