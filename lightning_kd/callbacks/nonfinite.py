"""NonFiniteGuard: a loss or gradient that is not finite stops the run (or skips the step) before it spoils
the weights, and no checkpoint is ever written from weights that are not finite.

Without it a run whose loss turned to inf and then NaN trains on to its last step with exit code 0: every later
checkpoint, ``last.ckpt`` and the exported student are all NaN, and with ``save_top_k=1`` no good checkpoint is
left. Every lightning-kd module adds one by default (``configure_callbacks``); put your own in the Trainer's
callbacks to choose another policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_kd.pruning.export import nonfinite_parameters

POLICIES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """Training stopped because the loss or the gradients were not finite."""


def _newest_checkpoint(trainer: L.Trainer) -> str | None:
    """The newest checkpoint file this run's checkpoint callbacks wrote (every one of them is finite: the guard
    refuses to write the others)."""
    paths = []
    for callback in trainer.checkpoint_callbacks:
        paths += [
            getattr(callback, "last_model_path", ""),
            getattr(callback, "best_model_path", ""),
            *getattr(callback, "best_k_models", {}),
        ]
    files = [Path(p) for p in paths if p and Path(p).is_file()]
    return str(max(files, key=lambda p: p.stat().st_mtime).resolve()) if files else None


class NonFiniteGuard(L.Callback):
    """Checks the loss, every logged term and every gradient before each optimizer step.

    Args:
        policy: ``stop`` (default) raises :class:`NonFiniteError` naming the step, the terms that are not finite
            (or the parameters whose gradients are not), and the newest checkpoint; ``skip`` drops that step's
            update (the learning-rate schedule still advances) and stops once more than ``max_skips`` steps were
            skipped in the run.
        max_skips: with ``skip``, how many steps the run may drop before it stops.

    Gradients that a mixed-precision GradScaler finds non-finite are its business (it skips the step and lowers
    its scale), so under ``16-mixed`` only a non-finite loss counts. The check costs one host-device
    synchronisation per optimizer step (one all-reduce of a flag under DDP, so every rank decides alike). It runs
    before every other callback's ``on_before_optimizer_step``, so importance scores never read a bad gradient.
    """

    def __init__(self, policy: str = "stop", max_skips: int = 10) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown non-finite policy {policy!r}: use one of {', '.join(POLICIES)}.")
        if max_skips < 0:
            raise ValueError(f"max_skips must be >= 0, got {max_skips}.")
        self.policy, self.max_skips = policy, max_skips
        self.skipped: list[int] = []
        self._seen: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # first in line, so the callbacks that read gradients before the step (pruning importance) never see a
        # bad one; moving it within the list does not disturb the loop running this hook
        trainer.callbacks.remove(self)
        trainer.callbacks.insert(0, self)

    @override
    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        terms = getattr(pl_module, "last_terms", None) or {}
        self._seen.append((loss.detach(), {k: v.detach() for k, v in terms.items()}))

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        seen, self._seen = self._seen, []
        named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        values = [v.float().reshape(()) for loss, terms in seen for v in (loss, *terms.values())]
        grad_max = list(torch._foreach_norm([g for _, g in named], ord=float("inf"))) if named else []
        flags = torch.stack([*values, *(m.float() for m in grad_max)]) if values or grad_max else None
        if flags is None:
            return
        finite = torch.isfinite(flags)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # a GradScaler skips steps with inf gradients by design; only the loss is ours to judge then
        bad_local = not bool(finite[: len(values)].all() if scaler is not None else finite.all())
        bad = (
            trainer.strategy.reduce_boolean_decision(bad_local, all=False)
            if trainer.world_size > 1
            else bad_local
        )
        if not bad:
            return
        step = trainer.global_step + 1
        what = self._describe(seen, named, finite[len(values) :]) if bad_local else "on another rank"
        if self.policy == "skip" and len(self.skipped) < self.max_skips:
            self.skipped.append(step)
            optimizer.zero_grad(set_to_none=True)  # optimizers leave parameters without gradients untouched
            rank_zero_warn(
                f"skipped optimizer step {step}: {what} ({len(self.skipped)} of at most "
                f"{self.max_skips} skips)."
            )
            return
        newest = _newest_checkpoint(trainer)
        skipped = f" after skipping steps {self.skipped}" if self.skipped else ""
        raise NonFiniteError(
            f"training stopped at optimizer step {step}{skipped}: {what}. The weights were not updated with it, "
            "and no checkpoint or export is written from non-finite weights. "
            + (
                f"The newest checkpoint, written before, is {newest}."
                if newest
                else "No checkpoint was written in this run before it."
            )
            + f" Usual fixes: a lower learning rate (now {self._learning_rate(trainer)}), gradient clipping "
            "(trainer.gradient_clip_val: 1.0), smaller term weights or a higher temperature; or "
            "NonFiniteGuard(policy='skip', max_skips=N) in the trainer's callbacks to drop rare bad steps."
        )

    @staticmethod
    def _describe(seen: list, named: list, grad_finite: torch.Tensor) -> str:
        for loss, terms in seen:
            bad_terms = [
                f"{name} = {float(value)}" for name, value in terms.items() if not torch.isfinite(value)
            ]
            if bad_terms:
                return "terms not finite: " + ", ".join(bad_terms)
            if not torch.isfinite(loss):
                return f"the loss is {float(loss)}"
        bad = [name for (name, _), ok in zip(named, grad_finite.tolist(), strict=True) if not ok]
        return f"gradients not finite in {len(bad)} parameters, first {', '.join(bad[:3])}"

    @staticmethod
    def _learning_rate(trainer: L.Trainer) -> float | str:
        optimizers = trainer.optimizers
        return optimizers[0].param_groups[0]["lr"] if optimizers else "unknown"

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        check_finite(pl_module, "write a checkpoint")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"skipped": list(self.skipped)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = list(state_dict.get("skipped", []))


def check_finite(model: torch.nn.Module, action: str) -> None:
    """Raise instead of letting ``action`` go ahead with parameters that are not finite."""
    bad = nonfinite_parameters(model)
    if bad:
        raise NonFiniteError(
            f"refusing to {action}: {len(bad)} parameters are not finite (first {', '.join(bad[:3])}). The run "
            "diverged; resume from an earlier checkpoint with a lower learning rate or gradient clipping."
        )
