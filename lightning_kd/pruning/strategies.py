"""What a HomoDistil pruning event does to the student: shrink it for real, or mask it.

:class:`~lightning_kd.pruning.callback.PruningCallback` decides which units go (the schedule, the importance, the
masks, rank 0's broadcast); a :class:`PruningStrategy` carries that decision out on the student, its optimizer
state, the importance statistics, the objective and DDP. :class:`ShrinkStrategy` (``physical=True``) removes the
units at every event, so the run gets cheaper as it prunes; :class:`MaskStrategy` (``physical=False``) keeps the
shapes fixed, masks the units with hooks and removes them at the end. Both compute the same student.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from lightning_kd.pruning.importance import UnitImportance
from lightning_kd.pruning.prune import prune_model, prune_model_, pruned_parameter_count
from lightning_kd.pruning.shrink import (
    expand_scores,
    follow_width,
    plain_dropout_,
    reindex_optimizer_,
    relative_masks,
    widen_dropout_,
)
from lightning_kd.pruning.units import Masks, apply_masks, masked_parameter_slices, unit_counts, zero_masked_
from lightning_kd.training.lightning_internals import attached_trainer
from lightning_kd.training.sharded_surgery import whole_student
from lightning_kd.training.sharding import shard_plan


class PruningStrategy:
    """How the callback's masks reach the student. Every method that changes the student returns its size in
    parameters once pruned, for the logs and the events table."""

    physical: bool

    def check(self, pl_module: L.LightningModule) -> None:
        """Refuse, at fit start, a module this strategy cannot prune."""

    def begin(self, pl_module: L.LightningModule, masks: Masks) -> int:
        """Bring the student in line with ``masks`` at fit start, fresh or resumed."""
        raise NotImplementedError

    def scores(self, scores: dict[str, torch.Tensor], masks: Masks) -> dict[str, torch.Tensor]:
        """The importance of every unit in the coordinates of ``masks`` (the student's full shape)."""
        return scores

    def before_optimizer_step(self) -> None:
        """Gradients are final here; the optimizer has not yet used them."""

    def apply(self, trainer: L.Trainer, pl_module: L.LightningModule, old: Masks, new: Masks) -> int:
        """An event: the student goes from keeping ``old`` to keeping ``new``."""
        raise NotImplementedError

    def finish(self, pl_module: L.LightningModule, masks: Masks) -> torch.nn.Module:
        """The student as a plain, physically pruned model, computing what it computed."""
        raise NotImplementedError


class ShrinkStrategy(PruningStrategy):
    """Remove the units at every event, on every rank, with everything shaped after the student."""

    physical = True

    def __init__(self, scorer: UnitImportance, align_dropout: bool = False) -> None:
        self.scorer = scorer
        self.align_dropout = align_dropout

    def begin(self, pl_module: L.LightningModule, masks: Masks) -> int:
        _check_shape(pl_module.student, masks)
        return _follow_shape(pl_module.student, masks, self.align_dropout)

    def scores(self, scores: dict[str, torch.Tensor], masks: Masks) -> dict[str, torch.Tensor]:
        # the statistics cover only the units the shrunk student still has
        return {kind: expand_scores(scores[kind], masks[kind]) for kind in masks}

    def apply(self, trainer: L.Trainer, pl_module: L.LightningModule, old: Masks, new: Masks) -> int:
        if all(torch.equal(new[kind], old[kind]) for kind in old):  # a rounded schedule may wait
            return sum(p.numel() for p in pl_module.student.parameters())
        relative = relative_masks(new, old)  # masks over the current student
        with whole_student(trainer, pl_module):  # FSDP2: gathered here, sharded again after; else nothing
            student = pl_module.student
            resizes = prune_model_(student, relative)
            if "hidden" in relative and not relative["hidden"].all():
                kept = relative["hidden"].nonzero().flatten()
                before = dict(pl_module.objective.named_parameters())
                pl_module.objective.follow_student_width(kept, student)
                resizes += follow_width(before, dict(pl_module.objective.named_parameters()), kept)
            for optimizer in trainer.optimizers:
                reindex_optimizer_(optimizer, resizes)
            self.scorer.keep_units(relative)
            parameters = _follow_shape(student, new, self.align_dropout)
        _rewrap_ddp(trainer)
        return parameters

    def finish(self, pl_module: L.LightningModule, masks: Masks) -> torch.nn.Module:
        plain_dropout_(pl_module.student)  # already pruned; only the dropout goes back to plain transformers
        plan = shard_plan(pl_module)
        if plan is not None and plan.skeleton is not None:  # FSDP2: what an export rebuilds the student from
            plain_dropout_(plan.skeleton)
        return pl_module.student


class MaskStrategy(PruningStrategy):
    """Keep the student's shapes: hooks mask the pruned units, whose weights, optimizer state and gradients stay
    zero; the units are removed at the end."""

    physical = False

    def __init__(self) -> None:
        self.handle: Any = None
        self.slices: list[tuple[torch.nn.Parameter, int, torch.Tensor]] = []  # what the masks zero

    def check(self, pl_module: L.LightningModule) -> None:
        compiled = bool(getattr(pl_module, "hparams", {}).get("compile", False)) or (
            getattr(pl_module.student, "_compiled_call_impl", None) is not None
        )
        if compiled:
            # dynamo skips module hook guards by default: a compiled student would keep computing with old masks
            raise ValueError(
                "PruningCallback(physical=False) masks the student with forward hooks, which a "
                "torch.compile'd student does not re-read when the masks change. Use physical=True "
                "(the default: the student really shrinks and recompiles once per shape), or "
                "compile=False."
            )

    def begin(self, pl_module: L.LightningModule, masks: Masks) -> int:
        return self._mask(pl_module, masks)

    def before_optimizer_step(self) -> None:
        # Terms that read pruned units directly (q/k/v relations) would otherwise revive them.
        with torch.no_grad():
            for parameter, dim, index in self.slices:
                if parameter.grad is not None:
                    parameter.grad.index_fill_(dim, index, 0.0)

    def apply(self, trainer: L.Trainer, pl_module: L.LightningModule, old: Masks, new: Masks) -> int:
        return self._mask(pl_module, new)

    def _mask(self, pl_module: L.LightningModule, masks: Masks) -> int:
        """(Re-)install the mask hooks and zero what they remove, weights and their optimizer state alike."""
        student = pl_module.student
        if self.handle is not None:
            self.handle.remove()
        self.handle = apply_masks(student, masks)
        self.slices = [
            (piece.parameter, piece.dim, piece.index.to(piece.parameter.device))
            for piece in masked_parameter_slices(student, masks)
        ]
        zero_masked_(student, masks)
        trainer = attached_trainer(pl_module)
        for optimizer in trainer.optimizers if trainer is not None else []:
            for parameter, dim, index in self.slices:
                for value in optimizer.state.get(parameter, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == parameter.shape:
                        value.index_fill_(dim, index, 0.0)
        return pruned_parameter_count(student, masks)

    def finish(self, pl_module: L.LightningModule, masks: Masks) -> torch.nn.Module:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        pl_module.student = prune_model(pl_module.student, masks)
        self.slices = []
        if "hidden" in masks and not masks["hidden"].all():
            pl_module.objective.follow_student_width(masks["hidden"].nonzero().flatten(), pl_module.student)
        return pl_module.student


def _check_shape(student: torch.nn.Module, masks: Masks) -> None:
    """A resumed shrinking run: the student (rebuilt from the checkpoint) must hold exactly the kept units."""
    counts = unit_counts(student)
    for kind, mask in masks.items():
        want = [int(k) for k in mask.sum(-1)] if kind != "hidden" else int(mask.sum())
        have = counts[kind] if kind != "hidden" else counts["hidden"]
        if want != have:
            raise ValueError(
                f"the student holds {kind} {have}, but the pruning state keeps {want}: this callback's state "
                "and the student come from different runs. Resume the module and the callback from the same "
                "checkpoint (Trainer.fit(..., ckpt_path=...))."
            )


def _follow_shape(student: torch.nn.Module, masks: Masks, align_dropout: bool) -> int:
    """After the student's shape is final for now: dropout at full width if asked; its size."""
    if align_dropout and "hidden" in masks and not masks["hidden"].all():
        widen_dropout_(student, masks["hidden"].numel(), masks["hidden"].nonzero().flatten())
    return sum(p.numel() for p in student.parameters())


def _rewrap_ddp(trainer: L.Trainer) -> None:
    """DDP registered the old parameters with its reducer: wrap the module again, on every rank at once.

    Every rank shrank at the same step to the same shapes (rank 0's decision was broadcast), so the new
    wrappers agree, and from here on only the kept parameters are all-reduced.
    """
    strategy = trainer.strategy
    if isinstance(strategy.model, torch.nn.parallel.DistributedDataParallel):
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()
