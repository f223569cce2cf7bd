"""What every lightning-kd module trains with: AdamW with linear warm-up (or a constant rate after it)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lightning_kd.checks import check_number

SCHEDULES = ("linear", "constant")


def check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}.")


def check_optimizer_settings(
    learning_rate: Any, weight_decay: Any, betas: Any, eps: Any, warmup_steps: Any
) -> None:
    """Refuse, when the module is built, AdamW settings that would fail (or silently misbehave) at fit start."""

    def number(name: str, value: Any, low: float, low_included: bool = True) -> None:
        hint = f" ({type(value).__name__}); write it without quotes, e.g. 1.0e-4"
        check_number(name, value, finite=True, hint=hint)
        check_number(
            name, value, low=low, low_open=not low_included, what=f"{'>=' if low_included else '>'} {low}"
        )

    number("learning_rate", learning_rate, 0.0, low_included=False)
    number("weight_decay", weight_decay, 0.0)
    number("eps", eps, 0.0, low_included=False)
    number("warmup_steps", warmup_steps, 0.0)
    if isinstance(betas, str) or not isinstance(betas, Sequence) or len(betas) != 2:
        raise ValueError(f"betas must be two numbers, e.g. [0.9, 0.999], got {betas!r}.")
    for beta in betas:
        number("each of betas", beta, 0.0)
        if beta >= 1:
            raise ValueError(f"each of betas must be below 1, got {list(betas)}.")


def adamw_with_warmup(
    parameters: Iterable[nn.Parameter],
    total_steps: int,
    learning_rate: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    warmup_steps: int | float = 0,
    schedule: str = "linear",
) -> dict[str, Any]:
    """Lightning's optimizer dict: AdamW (no decay on biases and norms, as BERT trains) and a per-step schedule.

    ``warmup_steps`` is a step count or a share of ``total_steps`` (a float below 1); ``linear`` then decays
    to 0 at ``total_steps``, ``constant`` stays at the peak.
    """
    check_schedule(schedule)
    if not math.isfinite(total_steps):
        raise ValueError(
            "the run has no last step (an endless data stream with no trainer.max_steps), so the learning-rate "
            "schedule has no end and training never stops. Set trainer.max_steps."
        )
    trainable = [p for p in parameters if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    # The fused implementation updates every tensor in a few kernels (for-each launches several per operation;
    # on a CPU it is several times faster), keeps its step counters on the parameters' device, and skips an
    # update on the device when NonFiniteGuard hands it a flag, so the guard never waits for the device.
    fused = bool(trainable) and all(
        p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in trainable
    )
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(betas), eps=eps, fused=fused or None)
    total = max(int(total_steps), 1)
    # a float below 1 is a share of the run; anything else (100, or 100.0 from YAML) counts steps
    warmup = (
        int(warmup_steps * total)
        if isinstance(warmup_steps, float) and warmup_steps < 1
        else int(warmup_steps)
    )
    if warmup > total:
        raise ValueError(
            f"the warm-up ({warmup} steps) is longer than the run ({total} optimizer steps): the learning rate "
            f"would never reach {learning_rate}. Set warmup_steps to at most {total}, or give it as a share of the "
            "run (e.g. 0.06)."
        )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        return max(0.0, (total - step) / max(total - warmup, 1))

    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": LambdaLR(optimizer, factor), "interval": "step"},
    }
