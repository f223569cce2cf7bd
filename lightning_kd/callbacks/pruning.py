"""PruningCallback: HomoDistil (Liang et al., ICLR 2023), pruning a copy of the teacher while it distils.

The student starts as the teacher, so the teacher-student discrepancy starts at zero; every ``interval``
steps the least important heads, FFN neurons and hidden dimensions are masked, a few at a time along a cubic
schedule, so the discrepancy stays small while the student shrinks. Importance is PLATON's (EMA of |θ·∇θ|
times EMA of its uncertainty) read from the student's own gradients before every optimizer step. At the end of fit
the student is physically pruned, so it is really smaller and faster, and exported if asked.

Everything the callback decides is in its ``state_dict`` (target, masks, importance statistics, schedule
position), so a run resumed from a checkpoint ends with the same student as one that never stopped. Under
DDP the gradients are already averaged, and rank 0's masks are broadcast at every event, so every rank
takes the same decision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from ..models import (
    Masks,
    PlatonImportance,
    Sensitivity,
    UnitImportance,
    apply_masks,
    check_export_dir,
    check_exportable,
    full_masks,
    masked_parameter_slices,
    prune_model,
    pruned_parameter_count,
    top_units,
    unit_counts,
    zero_masked_,
)
from ..timing import timed

PRUNABLE = ("heads", "ffn", "hidden")
SCHEDULES: dict[str, Callable[[float], float]] = {
    "cubic": lambda progress: 1.0 - (1.0 - progress) ** 3,  # Zhu & Gupta (2017), HomoDistil's choice
    "linear": lambda progress: progress,
    "one-shot": lambda progress: 1.0 if progress > 0 else 0.0,  # prune once, at the first event
}
IMPORTANCE = ("platon", "sensitivity")


class PruningCallback(L.Callback):
    """Prunes ``pl_module.student`` to ``target`` while it distils.

    Args:
        target: what remains at the end, per unit kind (``heads`` per layer, ``ffn`` neurons per layer,
            ``hidden`` dimensions): a fraction of the full size (float, e.g. ``0.5``) or a count (int).
        start_step, end_step: the schedule runs between these optimizer steps (``end_step`` defaults to the
            run's last step; a float in (0, 1) is a share of it, so a recipe keeps its shape at any length).
        interval: steps between pruning events.
        schedule: ``cubic`` (the share of the way to the target pruned after progress p is 1 - (1 - p)³),
            ``linear``, ``one-shot``, or any callable from progress in [0, 1] to that share.
        importance: ``platon`` (with ``beta1``, ``beta2``) or ``sensitivity`` (|θ·∇θ| summed since the start).
        same_per_layer: keep the same number of heads and neurons in every layer, so the result has a standard
            config; otherwise units compete across layers (every layer keeps at least one).
        export_dir: where to save the physically pruned student at the end of fit (a Hugging Face folder).
        prune_at_end: replace the masked student by the physically pruned one when training ends after the
            schedule has (a run stopped earlier stays masked, so its checkpoints resume).
        expect_copy: refuse a student whose shape is not the teacher's (HomoDistil starts from a copy).
    """

    def __init__(
        self,
        target: Mapping[str, int | float],
        start_step: int = 0,
        end_step: int | float | None = None,
        interval: int = 10,
        schedule: str | Callable[[float], float] = "cubic",
        importance: str = "platon",
        beta1: float = 0.85,
        beta2: float = 0.95,
        same_per_layer: bool = True,
        export_dir: str | None = None,
        prune_at_end: bool = True,
        expect_copy: bool = True,
    ) -> None:
        unknown = sorted(set(target) - set(PRUNABLE))
        if unknown or not target:
            raise ValueError(f"unknown target kinds {unknown or '(none given)'}: PruningCallback prunes "
                             f"{', '.join(PRUNABLE)}, e.g. target={{'hidden': 0.5, 'heads': 0.5, 'ffn': 0.5}}.")
        for kind, value in target.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"target {kind}={value!r} must be a number: a fraction (0.5) or a count (6), "
                                 "written without quotes.")
        if isinstance(schedule, str) and schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)} or a callable.")
        if importance not in IMPORTANCE:
            raise ValueError(f"unknown importance {importance!r}: use one of {', '.join(IMPORTANCE)}.")
        if interval < 1 or start_step < 0:
            raise ValueError(f"interval must be >= 1 and start_step >= 0, got {interval} and {start_step}.")
        self.target = dict(target)
        self.start_step, self.end_step, self.interval = start_step, end_step, interval
        self.schedule = SCHEDULES[schedule] if isinstance(schedule, str) else schedule
        kinds = list(self.target)
        self.scorer: UnitImportance = (PlatonImportance(beta1, beta2, kinds) if importance == "platon"
                                       else Sensitivity(kinds))
        self.same_per_layer = same_per_layer
        self.export_dir, self.prune_at_end, self.expect_copy = export_dir, prune_at_end, expect_copy
        self.masks: Masks | None = None
        self.last_event = -1
        self.events: list[dict[str, Any]] = []  # one row per event: step, kept units, parameters
        self.full: dict[str, int] = {}
        self.goal: dict[str, int] = {}
        self._handle: Any = None
        self._slices: list = []
        self._parameters = 0
        self._widths: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ set-up

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        student = pl_module.student
        counts = unit_counts(student)
        if self.expect_copy:
            teacher_counts = unit_counts(pl_module.teacher)
            if {k: counts[k] for k in PRUNABLE} != {k: teacher_counts[k] for k in PRUNABLE} and self.masks is None:
                raise ValueError(
                    "PruningCallback starts from a copy of the teacher (HomoDistil), but the student's shape "
                    f"(heads {counts['heads']}, ffn {counts['ffn']}, hidden {counts['hidden']}) is not the "
                    f"teacher's (heads {teacher_counts['heads']}, ffn {teacher_counts['ffn']}, hidden "
                    f"{teacher_counts['hidden']}). Use student={{'init': 'copy'}}, or expect_copy=False to prune "
                    "another student."
                )
        self.full = {"heads": max(counts["heads"]), "ffn": max(counts["ffn"]), "hidden": counts["hidden"]}
        self.goal = {kind: self._resolve(kind, value) for kind, value in self.target.items()}
        self._check_exportable(student, counts["layers"])
        if self.export_dir:
            check_export_dir(self.export_dir)
        if "heads" in self.goal:
            self._check_head_terms(pl_module, self.goal["heads"] * counts["head_size"])
        last = trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
        if self.end_step is None:
            self.end_step = last
        elif isinstance(self.end_step, float) and 0.0 < self.end_step < 1.0:
            self.end_step = max(self.start_step + 1, round(self.end_step * last))
        if self.end_step > last:
            raise ValueError(f"the pruning schedule ends at step {self.end_step}, after the run's last step "
                             f"{last}: the student would never reach its target. Set end_step <= {last} or "
                             "raise trainer.max_steps.")
        if self.end_step <= self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must come after start_step ({self.start_step}).")
        if self.masks is None:
            self.masks = {kind: full_masks(student)[kind] for kind in self.goal}
        self._apply(pl_module)

    def _check_exportable(self, student: torch.nn.Module, layers: int) -> None:
        hidden, heads = self.goal.get("hidden", self.full["hidden"]), self.goal.get("heads", self.full["heads"])
        if self.same_per_layer or "heads" not in self.goal:
            check_exportable(student, hidden, heads)
            return
        # units compete across layers: one layer may end with every head the others gave up
        widest = min(self.full["heads"], heads * layers - (layers - 1))
        try:
            check_exportable(student, hidden, widest)
        except ValueError as error:
            raise ValueError(f"with same_per_layer=False one layer may keep up to {widest} heads, and then: "
                             f"{error} Or set same_per_layer=True.") from error

    @staticmethod
    def _check_head_terms(pl_module: L.LightningModule, width: int) -> None:
        """Terms that read heads must still make sense once the student keeps ``width`` attention dimensions."""
        for name, term in pl_module.objective.terms.items():
            if term.kind == "attention":
                raise ValueError(f"term {name!r} matches attention maps head by head, which stops working once "
                                 "heads are pruned; use the 'relations' term, which works across head counts.")
            heads = getattr(term, "num_relation_heads", None)
            if term.kind == "relations" and width % heads:
                raise ValueError(f"term {name!r} splits q/k/v into {heads} relation heads, which do not divide the "
                                 f"{width} dimensions the pruned heads keep; set num_relation_heads to a divisor.")

    def _resolve(self, kind: str, value: float | int) -> int:
        full = self.full[kind]
        keep = round(value * full) if isinstance(value, float) else int(value)
        if not 1 <= keep <= full:
            raise ValueError(f"target {kind}={value!r} keeps {keep} of {full} {kind} units; the student can keep "
                             f"between 1 and {full} (a float is a fraction, an int a count).")
        return keep

    def _apply(self, pl_module: L.LightningModule) -> None:
        """(Re-)install the mask hooks and zero what they remove, weights and their optimizer state alike."""
        student = pl_module.student
        if self._handle is not None:
            self._handle.remove()
        self._handle = apply_masks(student, self.masks)
        self._slices = [(piece.parameter, piece.dim, piece.index.to(piece.parameter.device))
                        for piece in masked_parameter_slices(student, self.masks)]
        zero_masked_(student, self.masks)
        trainer = pl_module._trainer
        for optimizer in trainer.optimizers if trainer is not None else []:
            for parameter, dim, index in self._slices:
                for value in optimizer.state.get(parameter, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == parameter.shape:
                        value.index_fill_(dim, index, 0.0)
        self._parameters = pruned_parameter_count(student, self.masks)
        self._widths = {f"width/{kind}": float(mask.sum()) / mask.numel() for kind, mask in self.masks.items()}
        self._widths["params"] = float(self._parameters)

    # ------------------------------------------------------------------------------------------ every step

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        with timed(pl_module, "pruning"):
            # Here the gradients are final: unscaled (16-mixed), accumulated over micro-batches, averaged by DDP.
            if self.start_step <= trainer.global_step < self.end_step:
                self.scorer.update(pl_module.student)
            # Terms that read pruned units directly (q/k/v relations) would otherwise revive them.
            with torch.no_grad():
                for parameter, dim, index in self._slices:
                    if parameter.grad is not None:
                        parameter.grad.index_fill_(dim, index, 0.0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        due = step > self.start_step and ((step - self.start_step) % self.interval == 0 or step == self.end_step)
        if due and step <= self.end_step and step != self.last_event:
            with timed(pl_module, "pruning"):
                self._prune_event(trainer, pl_module, step)
        pl_module.log_dict(self.widths(), batch_size=1)

    def widths(self) -> dict[str, float]:
        """``width/<kind>``: the share of each kind that remains, and ``params``: the pruned model's size."""
        return dict(self._widths)

    def keep_counts(self, step: int) -> dict[str, int]:
        """How many units of each kind the schedule keeps after ``step`` (per layer for heads and FFN)."""
        span = max(self.end_step - self.start_step, 1)
        progress = min(max((step - self.start_step) / span, 0.0), 1.0)
        share = self.schedule(progress)
        return {kind: max(goal, round(self.full[kind] - (self.full[kind] - goal) * share))
                for kind, goal in self.goal.items()}

    def _prune_event(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        scores = self.scorer.scores()
        masks = {}
        for kind, keep in self.keep_counts(step).items():
            # units already pruned stay pruned: their weights are zero and they rank below everything
            ranked = scores[kind][..., : self.masks[kind].shape[-1]].masked_fill(~self.masks[kind], -math.inf)
            if kind == "hidden" or self.same_per_layer:
                masks[kind] = top_units(ranked, keep) & self.masks[kind]
            else:
                masks[kind] = _top_units_across_layers(ranked, keep) & self.masks[kind]
        # every rank holds (nearly) the same scores; rank 0's masks make the decision identical
        masks = trainer.strategy.broadcast(masks, src=0)
        self.masks = {kind: mask.cpu() for kind, mask in masks.items()}
        self.last_event = step
        self._apply(pl_module)
        self.events.append({"step": step, **{k: int(v.sum()) for k, v in self.masks.items()},
                            "params": self._parameters})

    # ------------------------------------------------------------------------------------------ the end

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run stopped before its schedule ended (preempted, early-stopped) stays masked, so that its
        # checkpoint resumes; `prune_student` still prunes it on demand.
        if self.prune_at_end and trainer.global_step >= self.end_step:
            self.prune_student(pl_module)
            if self.export_dir:
                self._export(pl_module)

    def prune_student(self, pl_module: L.LightningModule) -> torch.nn.Module:
        """Replace the masked student by the physically pruned one (what it computes stays the same)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        pl_module.student = prune_model(pl_module.student, self.masks)
        self._slices = []
        if "hidden" in self.masks and not self.masks["hidden"].all():
            pl_module.objective.narrow_student_width(self.masks["hidden"].nonzero().flatten())
            pl_module.objective.to(next(pl_module.student.parameters()))  # maps it built sit with the student
        return pl_module.student

    @rank_zero_only
    def _export(self, pl_module: L.LightningModule) -> None:
        path = pl_module.save_student(Path(self.export_dir))
        print(f"pruned student ({self._parameters / 1e6:.2f}M parameters) saved to {Path(path).resolve()}")

    # ------------------------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {"target": self.target, "masks": self.masks, "importance": self.scorer.state_dict(),
                "last_event": self.last_event, "events": self.events, "end_step": self.end_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if dict(state_dict["target"]) != self.target:
            raise ValueError(
                f"this checkpoint was pruned towards target {state_dict['target']}, but the callback now targets "
                f"{self.target}. Resume with the checkpoint's target, or start a new run from the exported "
                "student to prune it further."
            )
        self.masks = state_dict["masks"]
        self.scorer.load_state_dict(state_dict["importance"])
        self.last_event, self.events = state_dict["last_event"], list(state_dict["events"])
        if self.end_step is None:
            self.end_step = state_dict["end_step"]


def _top_units_across_layers(scores: torch.Tensor, keep_per_layer: int) -> torch.Tensor:
    """Keep ``keep_per_layer * layers`` units wherever they score best, and at least one in every layer."""
    layers, width = scores.shape
    mask = top_units(scores.reshape(1, -1), keep_per_layer * layers).reshape(layers, width)
    best = scores.argmax(dim=1)
    mask[torch.arange(layers), best] = True
    return mask
