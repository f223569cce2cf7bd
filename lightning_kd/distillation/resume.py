"""What a distillation run checks before it resumes from a checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from lightning_kd.training.checkpoints import check_resume


def check_distillation_resume(
    checkpoint: Mapping[str, Any], hparams: Mapping[str, Any], teacher_source: str
) -> None:
    """Refuse to resume ``checkpoint`` with other hyper-parameters or another teacher than it was made with,
    unless ``allow_changes`` names them (see :func:`lightning_kd.training.checkpoints.check_resume`)."""
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
