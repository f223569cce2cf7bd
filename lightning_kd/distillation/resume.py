"""What a distillation run checks before it resumes from a checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_kd.training.checkpoints import check_resume
from lightning_kd.training.provenance import (
    ArtifactMismatch,
    check_same_tokenizer,
    describe,
    model_record,
    same_model,
)


def check_distillation_resume(
    checkpoint: Mapping[str, Any],
    hparams: Mapping[str, Any],
    teacher_source: str,
    teacher: nn.Module | None = None,
    tokenizer: Any = None,
    path: str = "this checkpoint",
) -> None:
    """Refuse to resume ``checkpoint`` with other hyper-parameters or another teacher than it was made with,
    unless ``allow_changes`` names them (see :func:`lightning_kd.training.checkpoints.check_resume`).

    The teacher is compared by its source and by its weights (the fingerprint the checkpoint records): a teacher
    folder re-trained in place is another teacher under the same name. The data's tokenizer must be the one the
    run was trained on."""
    allowed = list(hparams.get("allow_changes", ()))
    check_resume(checkpoint, hparams, allowed)
    # a teacher passed as a model object is not a hyper-parameter, but its source is recorded
    recorded = checkpoint.get("lightning_kd", {}).get("teacher_source")
    if recorded and recorded != teacher_source:
        message = (
            f"this checkpoint was distilled from teacher {recorded!r}, but the module now holds "
            f"{teacher_source!r}"
        )
        if "teacher" not in allowed:
            raise ValueError(
                f"{message}. Resume with the checkpoint's teacher, or pass "
                "allow_changes=[teacher] to continue against the new one on purpose."
            )
        rank_zero_warn(f"{message}; resuming continues against the new teacher (allow_changes).")
    made = checkpoint.get("lightning_kd", {}).get("made_with") or {}
    if teacher is not None and made.get("teacher") and not same_model(made["teacher"], model_record(teacher)):
        message = (
            f"{path} was distilled from the teacher {describe(made['teacher'])}, but this run's teacher is "
            f"{describe(model_record(teacher))}"
        )
        if "teacher" not in allowed:
            raise ArtifactMismatch(
                f"{message}: other weights{' under the same name' if recorded == teacher_source else ''}. Resume "
                "with the teacher the run started with (restore its folder), or pass allow_changes=[teacher] to "
                "continue against this one on purpose."
            )
        if recorded == teacher_source:  # a changed source was warned about above
            rank_zero_warn(f"{message}; resuming continues against the new teacher (allow_changes).")
    check_same_tokenizer(
        made.get("tokenizer"),
        tokenizer,
        "the checkpoint",
        path,
        "Resume with the data's tokenizer the run was trained on (the teacher's own).",
    )
