"""Where a student comes from: a copy of the teacher, a fresh config, teacher layers, a saved model, ETD.

A student is declared in Python or YAML as one of
- a Hugging Face model, or a hub name / local folder (``"prajjwal1/bert-tiny"``, ``"runs/student"``);
- ``{"init": "copy"}``: the teacher itself, to be pruned (HomoDistil starts here);
- ``{"init": "config", "config": {"num_hidden_layers": 4, ...}}``: randomly initialised, the teacher's
  config with these fields changed (or ``"config": <name or folder>``);
- ``{"init": "layers", "num_layers": 6}`` or ``{"init": "layers", "layers": [0, 2, 4]}``: teacher blocks
  chosen uniformly (every other block ending at the top, as ETD takes them; DistilBERT took
  [0, 2, 4, 7, 9, 11], which ``layers`` reproduces) or by index, with the teacher's embeddings and heads;
- ``{"init": "extract", "num_layers": 4, "hidden_size": 384, "num_attention_heads": 6,
  "intermediate_size": 1536, "strategy": "rand" | "impt"}``: ETD (Chen et al., 2021), layers chosen uniformly
  and units kept at random or by the teacher's own importance; ``impt`` scores on ``data``, a DataLoader or a
  DataModule declared as in a recipe (``{"class_path": ..., "init_args": {...}}``), whose training batches
  must carry labels for the teacher's loss (MLM labels for a ``masked-lm`` teacher).
"""

from __future__ import annotations

import copy
import importlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from lightning_kd import hub
from lightning_kd.checks import check_number
from lightning_kd.models.layers import (
    freeze_unused_pooler,
    is_classifier,
    select_layers,
    uniform_layer_choice,
)
from lightning_kd.models.registry import get_adapter
from lightning_kd.pruning.extract import extract

log = logging.getLogger(__name__)

StudentSpec = PreTrainedModel | str | Mapping[str, Any]
COUNTS = ("num_layers", "hidden_size", "num_attention_heads", "intermediate_size")  # sizes in student specs


def _copy(teacher: PreTrainedModel) -> PreTrainedModel:
    return copy.deepcopy(teacher)


def _from_config(teacher: PreTrainedModel, config: Mapping[str, Any] | str | None = None) -> PreTrainedModel:
    if isinstance(config, str):
        new_config = hub.load_config(config)
    else:
        unknown = [k for k in (config or {}) if not hasattr(teacher.config, k)]
        if unknown:
            raise ValueError(
                f"student config fields {unknown} do not exist in {type(teacher.config).__name__}; "
                "check their spelling against the teacher's config.json."
            )
        new_config = type(teacher.config)(**{**teacher.config.to_dict(), **(config or {})})
    new_config._attn_implementation = teacher.config._attn_implementation
    return type(teacher)(new_config)


def _from_layers(
    teacher: PreTrainedModel, num_layers: int | None = None, layers: list[int] | None = None
) -> PreTrainedModel:
    if (num_layers is None) == (layers is None):
        raise ValueError(
            "the 'layers' student takes exactly one of `num_layers` (chosen uniformly) or `layers` "
            "(explicit teacher block indices, 0-based)."
        )
    if layers is None:
        layers = uniform_layer_choice(get_adapter(teacher).num_layers(teacher), num_layers)
    return select_layers(teacher, layers)


def _extract(teacher: PreTrainedModel, data: Any = None, **options: Any) -> PreTrainedModel:
    if isinstance(data, Mapping):
        data = _datamodule_batches(data)
    return extract(teacher, data=data, **options)


def _datamodule_batches(spec: Mapping[str, Any]) -> Any:
    """The training batches of a DataModule declared as ``{"class_path": ..., "init_args": {...}}``."""
    if "class_path" not in spec:
        raise ValueError(
            "an ETD `data` declaration needs `class_path` (e.g. lightning_kd.datamodules."
            "PretrainingDataModule) and `init_args`."
        )
    module_name, _, class_name = spec["class_path"].rpartition(".")
    datamodule = getattr(importlib.import_module(module_name), class_name)(**spec.get("init_args", {}))
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule.train_dataloader()


STUDENT_INITS: dict[str, Callable[..., PreTrainedModel]] = {
    "copy": _copy,
    "config": _from_config,
    "layers": _from_layers,
    "extract": _extract,
}


def register_student_init(name: str, builder: Callable[..., PreTrainedModel]) -> None:
    """Make ``{"init": name, **options}`` build students with ``builder(teacher, **options)``."""
    STUDENT_INITS[name] = builder


def build_student(spec: StudentSpec | None, teacher: PreTrainedModel, model_class: Any = None) -> nn.Module:
    """The student a spec declares (see the module docstring); none: a copy of the teacher, HomoDistil's start."""
    if spec is None:
        log.info(
            "no student given: it starts as a copy of the teacher (HomoDistil's start; student={'init': 'copy'})"
        )
        spec = {"init": "copy"}
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        # a classifier student must predict the teacher's labels (3 for MNLI, 1 score for STS-B), not the
        # checkpoint's default head, which is replaced by a fresh one when its size differs
        labels = (
            {
                "num_labels": teacher.config.num_labels,
                "problem_type": teacher.config.problem_type,
                "ignore_mismatched_sizes": True,
            }
            if is_classifier(teacher)
            else {}
        )
        return hub.load_model(spec, model_class or type(teacher), **labels)
    options = dict(spec)
    init = options.pop("init", None)
    if init not in STUDENT_INITS:
        raise ValueError(
            f"unknown student init {init!r}: use one of {', '.join(sorted(STUDENT_INITS))}, "
            "a hub name or folder, or a model object."
        )
    for key in COUNTS:
        value = options.get(key)
        if value is not None:
            hint = f" ({type(value).__name__}); write it without quotes"
            check_number(
                f"student init {init!r}: {key}", value, integer=True, what="a whole number", hint=hint
            )
    layers = options.get("layers")
    if layers is not None and (isinstance(layers, str) or not all(isinstance(i, int) for i in layers)):
        raise ValueError(
            f"student init {init!r}: layers must be a list of teacher block indices (0-based "
            f"integers), e.g. [0, 2, 4], got {layers!r}."
        )
    try:
        student = STUDENT_INITS[init](teacher, **options)
    except TypeError as error:
        raise ValueError(f"student init {init!r}: {error}") from error
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in student.parameters()):
        # built from a teacher kept in half precision: the student trains in float32 (precision options change
        # the arithmetic, never the student's master weights or its optimizer state)
        student.float()
    # built from a frozen teacher, so it inherits frozen parameters and eval mode
    student.requires_grad_(True).train()
    freeze_unused_pooler(student)
    return student
