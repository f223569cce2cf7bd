"""What a distilled student's model card says about how it was made and how fast it is next to its teacher."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kd.distillation.features import MODEL_INPUTS
from lightning_kd.training.card import describe_device, forward_ms


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
