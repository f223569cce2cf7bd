"""What DistillationModule decides before its first step: its arguments checked, the teacher loaded, the default
objective, which models ``compile`` compiles, and what a fit's precision means for the student."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)

from lightning_kd import hub
from lightning_kd.models.info import masked_lm_parts
from lightning_kd.models.layers import is_classifier
from lightning_kd.objective.term import ModelInfo

MODEL_CLASSES = {
    "base": AutoModel,
    "masked-lm": AutoModelForMaskedLM,
    "causal-lm": AutoModelForCausalLM,
    "sequence-classification": AutoModelForSequenceClassification,
    "question-answering": AutoModelForQuestionAnswering,
}
TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compiled_models(names: Sequence[str]) -> Sequence[str]:
    """``names``, the models ``compile: {models: ...}`` picks, once checked."""
    unknown = sorted(set(names) - {"student", "teacher"})
    if unknown or isinstance(names, str):
        raise ValueError(
            f"compile's models {unknown or names!r} are unknown: name 'student' and/or 'teacher' "
            "in a list, e.g. compile: {models: [teacher]}."
        )
    return names


def check_arguments(
    module_class: type,
    task: str,
    compile: Any,
    allow_changes: Sequence[str],
    teacher: str | nn.Module,
    num_labels: int | None,
) -> None:
    """Refuse, before anything loads, the constructor arguments of ``module_class`` that cannot work (the
    optimizer's are checked by :mod:`lightning_kd.training.optimizer`)."""
    if task not in MODEL_CLASSES:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(MODEL_CLASSES)}.")
    if not isinstance(compile, (bool, Mapping)):
        raise ValueError(f"compile must be true, false or a dict of torch.compile options, got {compile!r}.")
    if isinstance(compile, Mapping):
        compiled_models(compile.get("models", ("student", "teacher")))
    known = set(inspect.signature(module_class.__init__).parameters) - {"self", "allow_changes"}
    unknown = sorted(set(allow_changes) - known)
    if unknown:
        raise ValueError(
            f"allow_changes names {unknown}, which are not arguments of {module_class.__name__}: "
            f"choose among {', '.join(sorted(known))}."
        )
    if (
        isinstance(teacher, nn.Module)
        and num_labels is not None
        and is_classifier(teacher)
        and teacher.config.num_labels != num_labels
    ):
        raise ValueError(
            f"num_labels={num_labels}, but the teacher given predicts {teacher.config.num_labels} "
            "labels; drop num_labels (it only applies to a teacher loaded by name)."
        )


def load_teacher(
    teacher: str | PreTrainedModel, task: str, num_labels: int | None, teacher_dtype: str | None
) -> tuple[nn.Module, str]:
    """The teacher model, frozen and in eval mode (in its loaded dtype still), and where it came from."""
    if isinstance(teacher, nn.Module):
        model = teacher
    else:
        kwargs = {"num_labels": num_labels} if num_labels and task == "sequence-classification" else {}
        model = hub.load_model(teacher, MODEL_CLASSES[task], **kwargs)
    source = teacher if isinstance(teacher, str) else getattr(teacher.config, "_name_or_path", "")
    if teacher_dtype is not None and teacher_dtype not in TEACHER_DTYPES:
        raise ValueError(f"unknown teacher_dtype {teacher_dtype!r}: use one of {', '.join(TEACHER_DTYPES)}.")
    model.eval().requires_grad_(False)
    return model, source


def default_objective(teacher: ModelInfo, student: ModelInfo) -> list[dict[str, Any]]:
    """The prediction KL where both models predict (MSE of the scores for one-output heads, where a KL is
    always 0; for causal LMs the next-token KL, a chunk of positions at a time), else hidden-state MSE over the
    uniform layer map."""
    if teacher.causal and student.causal:
        return [{"term": "tokens", "loss": "forward_kl"}]
    if teacher.predicts and student.predicts:
        if 1 in (teacher.num_outputs, student.num_outputs):
            return [{"term": "logits", "loss": "mse"}]
        return [{"term": "logits", "temperature": 1.0}]
    return [{"term": "hidden", "loss": "mse", "layers": "uniform"}]


def check_vocabularies(teacher: nn.Module, student: nn.Module) -> None:
    t, s = teacher.config.vocab_size, student.config.vocab_size
    if t != s and _same_family_causal(teacher, student):
        # one family's sizes pad the same tokenizer's vocabulary differently (Qwen2.5-7B 152,064 rows, 0.5B
        # 151,936): the 'tokens' term compares the rows both have, and setup checks the data's tokenizer fits
        return
    if t != s:
        raise ValueError(
            f"teacher and student vocabularies differ ({t} vs {s} tokens), so the same token ids would mean "
            "different words. Build the student from the teacher (init: copy, layers or config) or pick a "
            "student that was trained with the teacher's tokenizer."
        )


def _same_family_causal(teacher: nn.Module, student: nn.Module) -> bool:
    causal = all(type(m).__name__.endswith("ForCausalLM") for m in (teacher, student))
    return causal and teacher.config.model_type == student.config.model_type


def compile_models(models: Mapping[str, nn.Module], options: bool | Mapping[str, Any]) -> None:
    """``torch.compile`` the ``models`` (by name) that ``options`` picks, in place, so parameter names,
    state_dict keys and the pruning hooks stay as they are."""
    options = {} if options is True else dict(options)
    for name in compiled_models(options.pop("models", ("student", "teacher"))):
        # a masked LM is called as encoder and head (see model_features), so those are what gets compiled
        parts = masked_lm_parts(models[name])
        for part in (parts.encoder, parts.head) if parts is not None else (models[name],):
            part.compile(**options)


def warn_if_true_half_precision(precision: str) -> None:
    """Say that a ``bf16-true``/``16-true`` fit trains and exports the student in half precision."""
    if precision.endswith("-true") and precision != "32-true":
        rank_zero_warn(
            f"precision={precision!r} trains the student's weights and its AdamW state in "
            f"{precision.split('-')[0]} and exports it so; use '{precision.split('-')[0]}-mixed' to "
            "keep float32 weights with half-precision arithmetic."
        )
