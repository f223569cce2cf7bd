"""PruningCallback: HomoDistil (Liang et al., ICLR 2023), pruning a copy of the teacher while it distils.

The student starts as the teacher, so the teacher-student discrepancy starts at zero; every ``interval``
steps the least important heads, FFN neurons and hidden dimensions are masked, a few at a time along a cubic
schedule, so the discrepancy stays small while the student shrinks. Importance is PLATON's (EMA of |θ·∇θ|
times EMA of its uncertainty) read from the student's own gradients before every optimizer step.

This file decides which units go: when (a :class:`~lightning_kd.pruning.schedule.PruningSchedule`), which (the
importance and the masks), and the same on every rank. Carrying the decision out is a strategy's
(``lightning_kd/pruning/strategies.py``). By default (``physical=True``) every event removes the units for real,
on every rank: the student is rebuilt in place with only the kept units (same class, config updated), and the
optimizer's moments, the importance statistics, the objective's projections and DDP follow the new shapes, so the
run gets cheaper as it prunes (see ``lightning_kd/pruning/shrink.py``). With ``physical=False`` the units are
masked by hooks and removed at the end of fit: fixed shapes, for research that needs them. Either way the student
computes the same thing.

Everything the callback decides is in its ``pruning_state()`` (target, masks, importance statistics, schedule
position), so a run resumed from a checkpoint ends with the same student as one that never stopped. Under
DDP the gradients are already averaged, and rank 0's masks are broadcast at every event, so every rank
takes the same decision.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from lightning_kd.checks import is_number
from lightning_kd.distillation.contract import require_run
from lightning_kd.pruning.export import check_export_dir, check_exportable
from lightning_kd.pruning.importance import PlatonImportance, Sensitivity, UnitImportance, top_units
from lightning_kd.pruning.schedule import PRUNABLE, SCHEDULES, PruningSchedule
from lightning_kd.pruning.strategies import MaskStrategy, PruningStrategy, ShrinkStrategy
from lightning_kd.pruning.units import Masks, full_masks, unit_counts
from lightning_kd.training.lightning_internals import logs_this_step, overflowed_per_device
from lightning_kd.training.sharded_surgery import student_for_export
from lightning_kd.training.timing import timed

log = logging.getLogger(__name__)

__all__ = ["IMPORTANCE", "PRUNABLE", "SCHEDULES", "PruningCallback"]

IMPORTANCE = ("platon", "sensitivity")
# HomoBERT-small's shape relative to its BERT-base teacher (Liang et al., ICLR 2023: 17.3M parameters): hidden 256
# of 768, 4 of 12 heads, FFN 1,024 of 3,072 per layer, every layer kept. The target when none is given.
HOMOBERT_SMALL = {"hidden": 1 / 3, "heads": 1 / 3, "ffn": 1 / 3}


class PruningCallback(L.Callback):
    """Prunes ``pl_module.student`` to ``target`` while it distils.

    Args:
        target: what remains at the end, per unit kind (``heads`` per layer, ``ffn`` neurons per layer,
            ``hidden`` dimensions): a fraction of the full size (float, e.g. ``0.5``) or a count (int). Left out,
            HomoBERT-small's shape relative to its teacher: a third of each (``HOMOBERT_SMALL``). The widths it
            resolves to are logged when fit starts.
        start_step, end_step: the schedule runs between these optimizer steps (``end_step`` defaults to the
            run's last step; a float in (0, 1) is a share of it, so a recipe keeps its shape at any length).
        interval: steps between pruning events.
        schedule: ``cubic`` (the share of the way to the target pruned after progress p is 1 - (1 - p)³),
            ``linear``, ``one-shot``, or any callable from progress in [0, 1] to that share.
        importance: ``platon`` (with ``beta1``, ``beta2`` and ``delta_t``, PLATON's window: the EMAs take the
            sensitivity averaged over that many steps; PLATON used 10) or ``sensitivity`` (|θ·∇θ| summed since
            the start). Importance is collected from the first step, so ``start_step`` is PLATON's initial
            warm-up; steps the optimizer skips (a GradScaler's overflow, or a
            :class:`~lightning_kd.callbacks.nonfinite.NonFiniteGuard`'s skip, for a non-finite loss as well) or
            with non-finite sensitivities do not count.
        same_per_layer: keep the same number of heads and neurons in every layer, so the result has a standard
            config; otherwise units compete across layers (every layer keeps at least one).
        export_dir: where to save the physically pruned student at the end of fit (a Hugging Face folder).
        prune_at_end: replace the masked student by the physically pruned one when training ends after the
            schedule has (a run stopped earlier stays masked, so its checkpoints resume).
        expect_copy: refuse a student whose shape is not the teacher's (HomoDistil starts from a copy).
        physical: remove the units at every event, so the student (and its optimizer state, checkpoints and
            DDP all-reduce) shrinks during the run; ``False`` masks them until the end instead.
        granularity: per kind, keep counts (between the start and the target) are rounded up to multiples of
            this, e.g. ``{"hidden": 64, "ffn": 64}``, so that the student changes shape a bounded number of
            times; the last event reaches the target exactly. Heads are always whole. Default 1.
        align_dropout: a shrunk student draws its residual-stream dropout at the width it started with and keeps
            the kept columns, so that it equals its masked twin (``physical=False``) bit for bit on a CPU; off,
            it draws at its own width, statistically the same and up to 1/keep times fewer random numbers (4%
            of a MiniLM step on a CPU at half width, ``benchmarks/pruning_overhead.py``).
    """

    def __init__(
        self,
        target: Mapping[str, int | float] | None = None,
        start_step: int = 0,
        end_step: int | float | None = None,
        interval: int = 10,
        schedule: str | Callable[[float], float] = "cubic",
        importance: str = "platon",
        beta1: float = 0.85,
        beta2: float = 0.95,
        delta_t: int = 1,
        same_per_layer: bool = True,
        export_dir: str | None = None,
        prune_at_end: bool = True,
        expect_copy: bool = True,
        physical: bool = True,
        granularity: Mapping[str, int] | None = None,
        align_dropout: bool = False,
    ) -> None:
        target = HOMOBERT_SMALL if target is None else target
        unknown = sorted(set(target) - set(PRUNABLE))
        if unknown or not target:
            raise ValueError(
                f"unknown target kinds {unknown or '(none given)'}: PruningCallback prunes "
                f"{', '.join(PRUNABLE)}, e.g. target={{'hidden': 0.5, 'heads': 0.5, 'ffn': 0.5}}."
            )
        for kind, value in target.items():
            if not is_number(value):
                raise ValueError(
                    f"target {kind}={value!r} must be a number: a fraction (0.5) or a count (6), "
                    "written without quotes."
                )
        # the schedule is a callable too: schedule(p) is the share of the way to the target pruned at progress p
        self.schedule = PruningSchedule(start_step, end_step, interval, schedule, granularity)
        if importance not in IMPORTANCE:
            raise ValueError(f"unknown importance {importance!r}: use one of {', '.join(IMPORTANCE)}.")
        self.target = dict(target)
        self.physical = physical
        kinds = list(self.target)
        self.scorer: UnitImportance = (
            PlatonImportance(beta1, beta2, kinds, delta_t) if importance == "platon" else Sensitivity(kinds)
        )
        self.strategy: PruningStrategy = (
            ShrinkStrategy(self.scorer, align_dropout) if physical else MaskStrategy()
        )
        self.same_per_layer = same_per_layer
        if export_dir and not prune_at_end:
            raise ValueError(
                f"export_dir={export_dir!r} with prune_at_end=False would export nothing: the student is exported "
                "when it is pruned at the end of fit. Drop prune_at_end=False, or export yourself after "
                "prune_student(module) with module.save_student(folder)."
            )
        self.export_dir, self.prune_at_end, self.expect_copy = export_dir, prune_at_end, expect_copy
        self.masks: Masks | None = None
        self.last_event = -1
        self.events: list[dict[str, Any]] = []  # one row per event: step, kept units, parameters
        self._parameters = 0
        self._widths: dict[str, float] = {}

    @property
    def end_step(self) -> int | float | None:
        """The schedule's last step: as given until fit starts, then the step itself."""
        return self.schedule.end_step

    @property
    def _slices(self) -> list[tuple[torch.nn.Parameter, int, torch.Tensor]]:
        """The parameter slices the masks keep at zero (none while shrinking: those are gone)."""
        return getattr(self.strategy, "slices", [])

    # ------------------------------------------------------------------------------------------ set-up

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Checked here, not by Lightning: its "more than one stateful callback" names no fix (the state goes in
        # the checkpoint through on_save_checkpoint for this reason, see below)
        pruners = [c for c in trainer.callbacks if isinstance(c, PruningCallback)]
        if len(pruners) > 1:
            targets = " and ".join(str(c.target) for c in pruners)
            raise ValueError(
                f"the Trainer has {len(pruners)} PruningCallbacks (targets {targets}), but one prunes every kind "
                "of unit of the student: keep one, with every kind in its target, e.g. "
                "PruningCallback({'heads': 0.5, 'ffn': 0.5, 'hidden': 0.5})."
            )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        require_run(pl_module, "PruningCallback")
        schedule = self.schedule
        window = getattr(self.scorer, "delta_t", 1)
        if schedule.start_step + schedule.interval < window:
            raise ValueError(
                f"the first pruning event (step {schedule.start_step + schedule.interval}) comes before PLATON's "
                f"first window of delta_t={window} steps closes; raise start_step or interval, or "
                "lower delta_t."
            )
        student = pl_module.student
        counts = unit_counts(student)
        if self.expect_copy:
            teacher_counts = unit_counts(pl_module.teacher)
            if {k: counts[k] for k in PRUNABLE} != {
                k: teacher_counts[k] for k in PRUNABLE
            } and self.masks is None:
                raise ValueError(
                    "PruningCallback starts from a copy of the teacher (HomoDistil), but the student's shape "
                    f"(heads {counts['heads']}, ffn {counts['ffn']}, hidden {counts['hidden']}) is not the "
                    f"teacher's (heads {teacher_counts['heads']}, ffn {teacher_counts['ffn']}, hidden "
                    f"{teacher_counts['hidden']}). Use student={{'init': 'copy'}}, or expect_copy=False to prune "
                    "another student."
                )
        full = {"heads": max(counts["heads"]), "ffn": max(counts["ffn"]), "hidden": counts["hidden"]}
        if self.masks is not None:  # resumed: a shrunk student is smaller than where the run started
            full.update({kind: mask.shape[-1] for kind, mask in self.masks.items()})
        self.strategy.check(pl_module)
        schedule.set_counts(full, self.target)
        if self.masks is None and all(keep == full[kind] for kind, keep in schedule.goal.items()):
            raise ValueError(
                f"target {self.target} keeps every unit ({', '.join(f'{k} {full[k]}' for k in schedule.goal)}), "
                "so PruningCallback would prune nothing: give a smaller target (e.g. 0.5 of each), or leave the "
                "callback out to distil without pruning."
            )
        widths = ", ".join(f"{kind} {full[kind]} -> {keep}" for kind, keep in schedule.goal.items())
        log.info(f"PruningCallback: target {self.target} resolves to {widths} (heads and ffn per layer)")
        self._check_exportable(student, counts["layers"])
        if self.export_dir:
            check_export_dir(self.export_dir)
        schedule.resolve_end(_last_step(trainer))
        if "heads" in schedule.goal:
            self._check_head_terms(pl_module, counts["head_size"])
        if self.masks is None:
            self.masks = {kind: full_masks(student)[kind] for kind in schedule.goal}
        self._record(self.strategy.begin(pl_module, self.masks))

    def _check_exportable(self, student: torch.nn.Module, layers: int) -> None:
        full, goal = self.schedule.full, self.schedule.goal
        hidden, heads = goal.get("hidden", full["hidden"]), goal.get("heads", full["heads"])
        if self.same_per_layer or "heads" not in goal:
            check_exportable(student, hidden, heads)
            return
        # units compete across layers: one layer may end with every head the others gave up
        widest = min(full["heads"], heads * layers - (layers - 1))
        try:
            check_exportable(student, hidden, widest)
        except ValueError as error:
            raise ValueError(
                f"with same_per_layer=False one layer may keep up to {widest} heads, and then: "
                f"{error} Or set same_per_layer=True."
            ) from error

    def _check_head_terms(self, pl_module: L.LightningModule, head_size: int) -> None:
        """Terms that read heads must make sense at every width the schedule passes through, not only the last
        (a relation split that fails at an intermediate width would crash the run there)."""
        # units competing across layers can leave a layer any number of heads
        counts = (
            self.schedule.counts_passed("heads")
            if self.same_per_layer
            else range(1, self.schedule.full["heads"] + 1)
        )
        widths = sorted(c * head_size for c in counts)
        for name, term in pl_module.objective.terms.items():
            if term.kind == "attention":
                raise ValueError(
                    f"term {name!r} matches attention maps head by head, which stops working once "
                    "heads are pruned; use the 'relations' term, which works across head counts."
                )
            heads = getattr(term, "num_relation_heads", None)
            bad = [w for w in widths if w % heads] if term.kind == "relations" else []
            if bad:
                common = math.gcd(*widths)
                fits = [d for d in range(1, common + 1) if common % d == 0 and d <= heads] or [1]
                raise ValueError(
                    f"term {name!r} splits q/k/v into {heads} relation heads, which do not divide the {bad[0]} "
                    f"dimensions the pruned heads keep at one point of the schedule (widths {widths}); set "
                    f"num_relation_heads to a divisor of every width, e.g. {fits[-1]}."
                )

    def _record(self, parameters: int) -> None:
        """The pruned student's size and widths, as the logs show them until the next event."""
        self._parameters = parameters
        self._widths = {
            f"width/{kind}": float(mask.sum()) / mask.numel() for kind, mask in self.masks.items()
        }
        self._widths["params"] = float(parameters)

    # ------------------------------------------------------------------------------------------ every step

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        with timed(pl_module, "pruning"):
            # Here the gradients are final: unscaled (16-mixed), accumulated over micro-batches, averaged by DDP.
            if trainer.global_step < self.schedule.end_step and any(
                p.grad is not None for p in pl_module.student.parameters()
            ):  # no gradients: a skipped step
                self.scorer.update(pl_module.student, _step_taken(trainer, pl_module, optimizer))
            self.strategy.before_optimizer_step()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.schedule.is_due(step) and step != self.last_event:
            with timed(pl_module, "pruning"):
                self._prune_event(trainer, pl_module, step)
        # Python floats become device tensors when logged (a blocking copy on a GPU): only where a logger reads.
        if logs_this_step(trainer):
            pl_module.log_dict(self.widths(), batch_size=1)

    def widths(self) -> dict[str, float]:
        """``width/<kind>``: the share of each kind that remains, and ``params``: the pruned model's size."""
        return dict(self._widths)

    def keep_counts(self, step: int) -> dict[str, int]:
        """How many units of each kind the schedule keeps after ``step`` (per layer for heads and FFN)."""
        return self.schedule.keep_counts(step)

    def _prune_event(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        scores = self.strategy.scores(self.scorer.scores(), self.masks)
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
        old, self.masks = self.masks, {kind: mask.cpu() for kind, mask in masks.items()}
        self.last_event = step
        self._record(self.strategy.apply(trainer, pl_module, old, self.masks))
        self.events.append(
            {"step": step, **{k: int(v.sum()) for k, v in self.masks.items()}, "params": self._parameters}
        )

    # ------------------------------------------------------------------------------------------ the end

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run stopped before its schedule ended (preempted, early-stopped) stays masked, so that its
        # checkpoint resumes; `prune_student` still prunes it on demand.
        if self.prune_at_end and trainer.global_step >= self.schedule.end_step:
            self.prune_student(pl_module)
            if self.export_dir:
                self._export(trainer, pl_module)

    def prune_student(self, pl_module: L.LightningModule) -> torch.nn.Module:
        """Replace the masked student by the physically pruned one (what it computes stays the same)."""
        return self.strategy.finish(pl_module, self.masks)

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # FSDP2: every rank takes part in gathering the student whole onto rank 0, which writes it
        with student_for_export(pl_module):
            if trainer.is_global_zero:
                path = Path(pl_module.save_student(Path(self.export_dir))).resolve()
                log.info(f"pruned student ({self._parameters / 1e6:.2f}M parameters) saved to {path}")

    # ------------------------------------------------------------------------------------------ checkpoints

    # The state is written to and read from checkpoint["callbacks"]["PruningCallback"], where Lightning's
    # state_dict hook would put it, by the checkpoint hooks: a callback overriding state_dict makes Lightning
    # refuse a second one when the Trainer is built, in words that name no fix (setup above names it).

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint.setdefault("callbacks", {})[self.state_key] = self.pruning_state()

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state:
            self.load_pruning_state(state)

    def pruning_state(self) -> dict[str, Any]:
        """What the callback decided so far (target, masks, importance statistics, schedule position)."""
        return {
            "target": self.target,
            "masks": self.masks,
            "importance": self.scorer.state_dict(),
            "last_event": self.last_event,
            "events": self.events,
            "end_step": self.schedule.end_step,
            "physical": self.physical,
        }

    def load_pruning_state(self, state_dict: dict[str, Any]) -> None:
        """Continue from ``pruning_state()``, refusing a checkpoint pruned towards another target or layout."""
        if dict(state_dict["target"]) != self.target:
            raise ValueError(
                f"this checkpoint was pruned towards target {state_dict['target']}, but the callback now targets "
                f"{self.target}. Resume with the checkpoint's target, or start a new run from the exported "
                "student to prune it further."
            )
        physical = state_dict.get("physical", False)  # checkpoints from before shrinking existed were masked
        if physical != self.physical:
            raise ValueError(
                f"this checkpoint comes from a run with physical={physical}, but the callback now has "
                f"physical={self.physical}: its student and statistics are laid out for the former. Resume with "
                f"physical={physical}."
            )
        self.masks = state_dict["masks"]
        self.scorer.load_state_dict(state_dict["importance"])
        self.last_event, self.events = state_dict["last_event"], list(state_dict["events"])
        if self.schedule.end_step is None:
            self.schedule.end_step = state_dict["end_step"]


def _last_step(trainer: L.Trainer) -> int:
    """The run's last optimizer step: the earlier of max_steps and the epochs' end (Lightning stops at
    whichever comes first, so a schedule that ends at max_steps would never finish)."""
    estimated = trainer.estimated_stepping_batches
    return int(estimated) if math.isfinite(estimated) and estimated > 0 else trainer.max_steps


def _step_taken(trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> torch.Tensor | None:
    """False (on the device, no sync) when the optimizer will not apply this step: a GradScaler found its
    gradients overflowed, or a NonFiniteGuard skips it (a non-finite loss, whose gradients may well be finite)."""
    # imported here: the guard's module imports this package
    from lightning_kd.callbacks.nonfinite import NonFiniteGuard

    skipped: list[torch.Tensor] = []
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    found = overflowed_per_device(scaler, optimizer) if scaler is not None else {}  # filled by unscale_
    skipped += [v.reshape(()).bool() for v in found.values()]
    for guard in (c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)):
        # this step's decision, whether the guard's own hook has run yet or not
        skip = guard.skips_step(trainer, pl_module, optimizer)
        if skip is not None:
            skipped.append(skip)
    return ~torch.stack([s.to(skipped[0].device) for s in skipped]).any() if skipped else None


def _top_units_across_layers(scores: torch.Tensor, keep_per_layer: int) -> torch.Tensor:
    """Keep ``keep_per_layer * layers`` units wherever they score best, and at least one in every layer."""
    layers, width = scores.shape
    mask = top_units(scores.reshape(1, -1), keep_per_layer * layers).reshape(layers, width)
    best = scores.argmax(dim=1)
    mask[torch.arange(layers), best] = True
    return mask
