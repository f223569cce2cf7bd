"""NonFiniteGuard: a loss or gradient that is not finite stops the run (or skips the step) before it spoils
the weights, and no checkpoint is ever written from weights that are not finite.

Without it a run whose loss turned to inf and then NaN trains on to its last step with exit code 0: every later
checkpoint, ``last.ckpt`` and the exported student are all NaN, and with ``save_top_k=1`` no good checkpoint is
left. Every lightning-kd module adds one by default (``configure_callbacks``); put your own in the Trainer's
callbacks to choose another policy.

The decision is taken on the device, so the step never waits for it: the guard computes a flag from the loss,
the terms and the gradients, and hands it to the optimizer, which skips the update when it is set (torch's fused
optimizers take it as ``found_inf``, as they do from a GradScaler: parameters, moments and step counts stay as
they were). The host reads the flags of the steps since the last read only where it reads anyway: on logging
steps, before a checkpoint is written and at the end of training; that is where the guard warns or stops.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_kd.pruning.export import nonfinite_parameters
from lightning_kd.training.lightning_internals import logs_this_step, overflowed_per_device

POLICIES = ("stop", "skip")
# the optimizers whose fused step reads a `found_inf` flag and leaves everything untouched when it is set
_FLAG_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


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


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (a DTensor under FSDP2); a plain tensor as it is."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def takes_skip_flag(optimizer: Any) -> bool:
    """Whether ``optimizer.step`` skips its update on the device when ``optimizer.found_inf`` is set."""
    return isinstance(optimizer, _FLAG_OPTIMIZERS) and all(g.get("fused") for g in optimizer.param_groups)


class NonFiniteGuard(L.Callback):
    """Checks the loss, every logged term and every gradient before each optimizer step.

    Args:
        policy: ``stop`` (default) skips the bad update and every later one, and raises :class:`NonFiniteError`
            at the next logging step (or checkpoint, or the end of training), naming the bad step, the terms
            that are not finite (or the parameters whose gradients are not), and the newest checkpoint; the
            weights stay those of the last finite step. ``skip`` drops that step's update (the learning-rate
            schedule still advances) and stops once more than ``max_skips`` steps were skipped in the run.
        max_skips: with ``skip``, how many steps the run may drop before it stops.

    Gradients that a mixed-precision GradScaler finds non-finite are its business (it skips the step and lowers
    its scale), so under ``16-mixed`` only a non-finite loss counts, and the guard's flag joins the scaler's.
    The check costs no host-device synchronisation with an optimizer that takes a skip flag (torch's fused
    Adam, AdamW, SGD and Adagrad; lightning-kd's modules use fused AdamW) and one all-reduce of a flag under DDP,
    on the device, so every rank decides alike. With another optimizer it reads the flag every step (one sync)
    and drops a bad step's gradients instead. It runs before every other callback's
    ``on_before_optimizer_step``, so they read the gradients it judged; a callback that must know whether the
    coming update is applied (pruning importance) asks :meth:`skips_step`, which gives this step's decision in
    whichever order the hooks run.
    """

    def __init__(self, policy: str = "stop", max_skips: int = 10) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown non-finite policy {policy!r}: use one of {', '.join(POLICIES)}.")
        if max_skips < 0:
            raise ValueError(f"max_skips must be >= 0, got {max_skips}.")
        self.policy, self.max_skips = policy, max_skips
        self.skipped: list[int] = []
        self._seen: list[tuple[torch.Tensor, Any]] = []
        # one entry per optimizer step since the host last read the flags: (step, names of the checked values,
        # names of the parameters, the values and largest gradients, bad here, bad on any rank)
        self._pending: list[tuple[int, list[str], list[str], torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._bad_since_read: torch.Tensor | None = None  # on the device: bad steps since the last read
        self._halted: torch.Tensor | None = None  # on the device: every later update is skipped
        self._flagged: list[Any] = []  # optimizers given a flag this step
        # this batch's decisions by (global step, optimizer): (skip or None, the gradients judged)
        self._decided: dict[tuple[int, int], tuple[torch.Tensor | None, list]] = {}
        self._stopped: str | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # first in line, so the callbacks that read gradients before the step (pruning importance) never see a
        # bad one; moving it within the list does not disturb the loop running this hook
        trainer.callbacks.remove(self)
        trainer.callbacks.insert(0, self)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._decided = {}  # a run that raised mid-step may have left one behind

    @override
    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        self._seen.append((loss, getattr(pl_module, "last_terms", None) or {}))

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        skip, named = self._decision(trainer, pl_module, optimizer)
        if skip is None:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self._join_scaler(overflowed_per_device(scaler, optimizer), named, skip)
        elif takes_skip_flag(optimizer):
            optimizer.found_inf = skip.float()
            self._flagged.append(optimizer)
        elif bool(skip):  # an optimizer that cannot take the flag: decide on the host now
            optimizer.zero_grad(set_to_none=True)  # optimizers leave parameters without gradients untouched

    def skips_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> torch.Tensor | None:
        """Whether this optimizer step's update is dropped, as a device bool (no sync); ``None`` when there was
        nothing to check. Decided once per step, by whichever asks first: this guard's own hook, or a callback
        that must know before the step whether it counts (pruning importance), whatever their order."""
        return self._decision(trainer, pl_module, optimizer)[0]

    def _decision(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> tuple[torch.Tensor | None, list[tuple[str, torch.Tensor]]]:
        key = (trainer.global_step, id(optimizer))
        if key not in self._decided:
            self._decided[key] = self._judge(trainer, pl_module)
        return self._decided[key]

    def _judge(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> tuple[torch.Tensor | None, list[tuple[str, torch.Tensor]]]:
        seen, self._seen = self._seen, []
        # under FSDP2 each rank checks its own shards (DTensors' local parts); _agree combines the verdicts
        named = [(n, _local(p.grad)) for n, p in pl_module.named_parameters() if p.grad is not None]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        with torch.no_grad():
            values = [v.detach().float().reshape(()) for loss, terms in seen for v in (loss, *terms.values())]
            # A GradScaler skips steps with inf gradients by design; only the loss is ours to judge then. The L2
            # norm (squares summed in float32) is not finite when a gradient is not, or when one is too large for
            # AdamW's second moment (|g| above about 1e19) as well; on a CPU it costs a thirtieth of the max-abs
            # norm (15 ms against 450 ms for 23 M gradients), and on a GPU both are one pass over the gradients.
            grad_norms = (
                list(torch._foreach_norm([g for _, g in named], ord=2, dtype=torch.float32))
                if named and scaler is None
                else []
            )
            if not values and not grad_norms:
                return None, named
            checked = torch.stack([*values, *(m.float() for m in grad_norms)])
            bad_here = ~torch.isfinite(checked).all()
            bad = self._agree(trainer, bad_here)
            skip = self._decide(bad)
        step = trainer.global_step + 1
        names = [name for _, terms in seen for name in ("loss", *terms)]
        self._pending.append(
            (step, names, [n for n, _ in named] if grad_norms else [], checked, bad_here, bad)
        )
        return skip, named

    @staticmethod
    def _join_scaler(found_inf: dict, named: list, skip: torch.Tensor) -> None:
        """Make a GradScaler skip the update when ``skip`` is set, as it does for an overflow (lowering its
        scale): its flags when it has unscaled already, else a NaN in one gradient, which it is yet to check."""
        with torch.no_grad():
            if found_inf:
                for found in found_inf.values():
                    found.copy_(torch.maximum(found, skip.to(found)))
            elif named:
                grad = named[0][1]
                grad.view(-1)[:1].add_(torch.where(skip, float("nan"), 0.0).to(grad))

    @staticmethod
    def _agree(trainer: L.Trainer, bad_here: torch.Tensor) -> torch.Tensor:
        """Whether any rank found this step bad, as a device flag (an all-reduce queued on the device)."""
        if trainer.world_size == 1 or not torch.distributed.is_initialized():
            return bad_here
        flag = bad_here.float()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag > 0

    def _decide(self, bad: torch.Tensor) -> torch.Tensor:
        """Whether to skip this update, on the device: a bad step is skipped; past the skip budget (none with
        ``stop``) the run is halted, and every later update is skipped until the host reads the flags."""
        if self._bad_since_read is None or self._bad_since_read.device != bad.device:
            self._bad_since_read = torch.zeros((), device=bad.device)
            self._halted = torch.zeros((), dtype=torch.bool, device=bad.device)
        budget = self.max_skips - len(self.skipped) if self.policy == "skip" else 0
        self._bad_since_read = self._bad_since_read + bad
        self._halted = self._halted | (self._bad_since_read > budget)
        return bad | self._halted

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        for optimizer in self._flagged:
            optimizer.__dict__.pop("found_inf", None)  # a flag for this step only
        self._flagged = []
        self._decided = {}
        if logs_this_step(trainer):
            self.settle(trainer)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.settle(trainer)

    def settle(self, trainer: L.Trainer) -> None:
        """Read the flags of the steps since the last read (one sync): warn of the skipped steps, and raise
        :class:`NonFiniteError` when the run has to stop."""
        if self._stopped is not None:
            raise NonFiniteError(self._stopped)
        pending, self._pending = self._pending, []
        if not pending:
            return
        self._bad_since_read = None
        flags = torch.stack([torch.stack([p[4], p[5]]) for p in pending])
        if not bool(flags.any()):  # the usual answer, in one read
            return
        flags = flags.tolist()
        for (step, names, params, checked, _, _), (bad_here, bad) in zip(pending, flags, strict=True):
            if not bad:
                continue
            what = self._describe(names, params, checked) if bad_here else "on another rank"
            if self.policy == "skip" and len(self.skipped) < self.max_skips:
                self.skipped.append(step)
                rank_zero_warn(
                    f"skipped optimizer step {step}: {what} ({len(self.skipped)} of at most "
                    f"{self.max_skips} skips)."
                )
                continue
            self._stopped = self._message(trainer, step, what)
            raise NonFiniteError(self._stopped)

    def _message(self, trainer: L.Trainer, step: int, what: str) -> str:
        newest = _newest_checkpoint(trainer)
        skipped = f" after skipping steps {self.skipped}" if self.skipped else ""
        now = trainer.global_step
        later = f" nor with any later one (the run stopped at step {now})" if now > step else ""
        return (
            f"training stopped at optimizer step {step}{skipped}: {what}. The weights were not updated with it"
            f"{later}, and no checkpoint or export is written from them. "
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
    def _describe(names: list[str], params: list[str], checked: torch.Tensor) -> str:
        values = checked.tolist()
        terms, grads = values[: len(names)], values[len(names) :]
        bad_terms = [
            f"{name} = {value}"
            for name, value in zip(names, terms, strict=True)
            if name != "loss" and not math.isfinite(value)
        ]
        if bad_terms:
            return "terms not finite: " + ", ".join(bad_terms)
        for value in terms:
            if not math.isfinite(value):
                return f"the loss is {value}"
        bad = [name for name, value in zip(params, grads, strict=True) if not math.isfinite(value)]
        return (
            f"gradients not finite (or too large to square in float32) in {len(bad)} parameters, first "
            f"{', '.join(bad[:3])}"
        )

    @staticmethod
    def _learning_rate(trainer: L.Trainer) -> float | str:
        optimizers = trainer.optimizers
        return optimizers[0].param_groups[0]["lr"] if optimizers else "unknown"

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._pending or self._stopped is not None:
            self.settle(trainer)  # a checkpoint waits for the device anyway: never write one after a bad step
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
