"""Exporting a distilled student: the folder, and what its model card says about how the student was made and how
fast it is next to its teacher."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kd import hub
from lightning_kd.distillation.features import MODEL_INPUTS
from lightning_kd.models.layers import is_classifier
from lightning_kd.pruning.export import parameter_count
from lightning_kd.training.card import describe_device, forward_ms
from lightning_kd.training.lightning_internals import attached_trainer
from lightning_kd.training.provenance import made_with


def describe_method(spec: Any, term_names: Iterable[str], callbacks: Iterable[Any]) -> str:
    """What made a student, in one line: its initialisation (``spec``, the module's ``student`` argument),
    the objective's terms, and the callbacks that changed it."""
    init = (
        spec.get("init") if isinstance(spec, Mapping) else spec if isinstance(spec, str) else "a given model"
    )
    if init == "extract":
        init = f"extract (ETD, {spec.get('strategy', 'rand')})"
    parts = [f"student from {init}", f"objective: {', '.join(term_names)}"]
    names = {"PruningCallback": "HomoDistil pruning", "TEDFilterCallback": "TED filters"}
    found = [names[type(c).__name__] for c in callbacks if type(c).__name__ in names]
    return "; ".join(parts + found)


def forward_speed(
    teacher: nn.Module, student: nn.Module, probe: Mapping[str, Tensor], device: torch.device
) -> dict[str, Any]:
    """Both models' forward time on the batch ``probe``, as the model card's ``speed``."""
    batch = {k: v for k, v in probe.items() if k in MODEL_INPUTS}
    ms = forward_ms({"teacher": teacher, "student": student}, batch)
    return {
        "teacher_ms": ms["teacher"],
        "student_ms": ms["student"],
        "batch": "x".join(str(n) for n in batch["input_ids"].shape),
        "device": describe_device(device),
    }


def export_student(
    module: Any,
    path: str | os.PathLike,
    tokenizer: Any = None,
    probe: Mapping[str, Tensor] | None = None,
    discrepancy: Mapping[str, tuple[float, float]] | None = None,
) -> str:
    """``DistillationModule.save_student``: the student's folder, with the DataModule's tokenizer unless one is
    given, the task's label names, and a card naming the teacher, the method, the speed and the metrics."""
    # imported here: training.export reaches this package through pruning (PruningCallback), so a module-level
    # import makes `import lightning_kd.training.export` alone circular
    from lightning_kd.training.export import CardFacts, export_model

    trainer = attached_trainer(module)
    datamodule = getattr(trainer, "datamodule", None)
    if tokenizer is None:
        tokenizer = getattr(datamodule, "tokenizer", None)
    if isinstance(tokenizer, str):
        tokenizer = hub.load_tokenizer(tokenizer)
    label_names = getattr(datamodule, "label_names", None) if is_classifier(module.student) else None
    root = trainer.default_root_dir if trainer is not None else tempfile.gettempdir()

    def card() -> CardFacts:
        speed = None if probe is None else forward_speed(module.teacher, module.student, probe, module.device)
        return CardFacts(
            teacher=module.teacher_source,
            method=module.method_description(),
            recipe=getattr(module, "recipe", None),
            teacher_parameters=parameter_count(module.teacher),
            speed=speed,
            discrepancy=discrepancy,
            metrics=module.teacher_comparison.card_metrics(),
            made_with=made_with(module, module.student, module.teacher),
        )

    export_model(
        module.student,
        path,
        tokenizer,
        label_names,
        card=card,
        rescue_root=root,
        log_sizes=True,
        name="student",
    )
    return str(path)
