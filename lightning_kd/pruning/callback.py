"""PruningCallback: HomoDistil (Liang et al., ICLR 2023), pruning a copy of the teacher while it distils.

The student starts as the teacher, so the teacher-student discrepancy starts at zero; every ``interval``
steps the least important heads, FFN neurons and hidden dimensions are masked, a few at a time along a cubic
schedule, so the discrepancy stays small while the student shrinks. Importance is PLATON's (EMA of |θ·∇θ|
times EMA of its uncertainty) read from the student's own gradients before every optimizer step.

By default (``physical=True``) every event removes the units for real, on every rank: the student is rebuilt in
place with only the kept units (same class, config updated), and the optimizer's moments, the importance
statistics, the objective's projections and DDP follow the new shapes, so the run gets cheaper as it prunes
(see ``lightning_kd/pruning/shrink.py``). With ``physical=False`` the units are masked by hooks and removed at
the end of fit: fixed shapes, for research that needs them. Either way the student computes the same thing.

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

from lightning_kd.pruning.export import check_export_dir, check_exportable
from lightning_kd.pruning.importance import PlatonImportance, Sensitivity, UnitImportance, top_units
from lightning_kd.pruning.prune import prune_model, prune_model_, pruned_parameter_count
from lightning_kd.pruning.shrink import (
    expand_scores,
    follow_width,
    plain_dropout_,
    reindex_optimizer_,
    relative_masks,
    widen_dropout_,
)
from lightning_kd.pruning.units import (
    Masks,
    apply_masks,
    full_masks,
    masked_parameter_slices,
    unit_counts,
    zero_masked_,
)
from lightning_kd.training.timing import timed

PRUNABLE = ("heads", "ffn", "hidden")


def cubic(progress: float) -> float:
    return 1.0 - (1.0 - progress) ** 3  # Zhu & Gupta (2017), HomoDistil's choice


def linear(progress: float) -> float:
    return progress


def one_shot(progress: float) -> float:
    return 1.0 if progress > 0 else 0.0  # prune once, at the first event


# functions, not lambdas: the callback is pickled into every process under ddp_spawn
SCHEDULES: dict[str, Callable[[float], float]] = {"cubic": cubic, "linear": linear, "one-shot": one_shot}
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
        importance: ``platon`` (with ``beta1``, ``beta2`` and ``delta_t``, PLATON's window: the EMAs take the
            sensitivity averaged over that many steps; PLATON used 10) or ``sensitivity`` (|θ·∇θ| summed since
            the start). Importance is collected from the first step, so ``start_step`` is PLATON's initial
            warm-up; steps the optimizer skips (a GradScaler's overflow) or with non-finite sensitivities do
            not count.
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
        delta_t: int = 1,
        same_per_layer: bool = True,
        export_dir: str | None = None,
        prune_at_end: bool = True,
        expect_copy: bool = True,
        physical: bool = True,
        granularity: Mapping[str, int] | None = None,
    ) -> None:
        unknown = sorted(set(target) - set(PRUNABLE))
        if unknown or not target:
            raise ValueError(
                f"unknown target kinds {unknown or '(none given)'}: PruningCallback prunes "
                f"{', '.join(PRUNABLE)}, e.g. target={{'hidden': 0.5, 'heads': 0.5, 'ffn': 0.5}}."
            )
        for kind, value in target.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(
                    f"target {kind}={value!r} must be a number: a fraction (0.5) or a count (6), "
                    "written without quotes."
                )
        if isinstance(schedule, str) and schedule not in SCHEDULES:
            raise ValueError(
                f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)} or a callable."
            )
        if importance not in IMPORTANCE:
            raise ValueError(f"unknown importance {importance!r}: use one of {', '.join(IMPORTANCE)}.")
        if interval < 1 or start_step < 0:
            raise ValueError(f"interval must be >= 1 and start_step >= 0, got {interval} and {start_step}.")
        granularity = dict(granularity or {})
        bad = {k: v for k, v in granularity.items() if k not in PRUNABLE or not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(
                f"granularity {bad} is invalid: give whole numbers >= 1 for kinds among "
                f"{', '.join(PRUNABLE)}, e.g. granularity={{'hidden': 64, 'ffn': 64}}."
            )
        self.target = dict(target)
        self.physical, self.granularity = physical, granularity
        self.start_step, self.end_step, self.interval = start_step, end_step, interval
        self.schedule = SCHEDULES[schedule] if isinstance(schedule, str) else schedule
        kinds = list(self.target)
        self.scorer: UnitImportance = (
            PlatonImportance(beta1, beta2, kinds, delta_t) if importance == "platon" else Sensitivity(kinds)
        )
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
        window = getattr(self.scorer, "delta_t", 1)
        if self.start_step + self.interval < window:
            raise ValueError(
                f"the first pruning event (step {self.start_step + self.interval}) comes before PLATON's "
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
        self.full = {"heads": max(counts["heads"]), "ffn": max(counts["ffn"]), "hidden": counts["hidden"]}
        if self.masks is not None:  # resumed: a shrunk student is smaller than where the run started
            self.full.update({kind: mask.shape[-1] for kind, mask in self.masks.items()})
        self._check_compile(pl_module)
        self.goal = {kind: self._resolve(kind, value) for kind, value in self.target.items()}
        self._check_exportable(student, counts["layers"])
        if self.export_dir:
            check_export_dir(self.export_dir)
        last = trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
        if self.end_step is None:
            self.end_step = last
        elif isinstance(self.end_step, float) and 0.0 < self.end_step < 1.0:
            self.end_step = max(self.start_step + 1, round(self.end_step * last))
        if self.end_step > last:
            raise ValueError(
                f"the pruning schedule ends at step {self.end_step}, after the run's last step "
                f"{last}: the student would never reach its target. Set end_step <= {last} or "
                "raise trainer.max_steps."
            )
        if self.end_step <= self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must come after start_step ({self.start_step}).")
        if "heads" in self.goal:
            self._check_head_terms(pl_module, counts["head_size"])
        if self.masks is None:
            self.masks = {kind: full_masks(student)[kind] for kind in self.goal}
        if self.physical:
            self._check_shape(student)
            self._follow_shape(pl_module)
        else:
            self._apply(pl_module)

    def _check_compile(self, pl_module: L.LightningModule) -> None:
        compiled = bool(getattr(pl_module, "hparams", {}).get("compile", False)) or (
            getattr(pl_module.student, "_compiled_call_impl", None) is not None
        )
        if compiled and not self.physical:
            # dynamo skips module hook guards by default: a compiled student would keep computing with old masks
            raise ValueError(
                "PruningCallback(physical=False) masks the student with forward hooks, which a "
                "torch.compile'd student does not re-read when the masks change. Use physical=True "
                "(the default: the student really shrinks and recompiles once per shape), or "
                "compile=False."
            )

    def _check_shape(self, student: torch.nn.Module) -> None:
        """A resumed shrinking run: the student (rebuilt from the checkpoint) must hold exactly the kept units."""
        counts = unit_counts(student)
        for kind, mask in self.masks.items():
            want = [int(k) for k in mask.sum(-1)] if kind != "hidden" else int(mask.sum())
            have = counts[kind] if kind != "hidden" else counts["hidden"]
            if want != have:
                raise ValueError(
                    f"the student holds {kind} {have}, but the pruning state keeps {want}: this callback's state "
                    "and the student come from different runs. Resume the module and the callback from the same "
                    "checkpoint (Trainer.fit(..., ckpt_path=...))."
                )

    def _follow_shape(self, pl_module: L.LightningModule) -> None:
        """After the student's shape is final for now: dropout at full width, widths for the logs."""
        student = pl_module.student
        if "hidden" in self.masks and not self.masks["hidden"].all():
            widen_dropout_(student, self.masks["hidden"].numel(), self.masks["hidden"].nonzero().flatten())
        self._parameters = sum(p.numel() for p in student.parameters())
        self._widths = {
            f"width/{kind}": float(mask.sum()) / mask.numel() for kind, mask in self.masks.items()
        }
        self._widths["params"] = float(self._parameters)

    def _check_exportable(self, student: torch.nn.Module, layers: int) -> None:
        hidden, heads = (
            self.goal.get("hidden", self.full["hidden"]),
            self.goal.get("heads", self.full["heads"]),
        )
        if self.same_per_layer or "heads" not in self.goal:
            check_exportable(student, hidden, heads)
            return
        # units compete across layers: one layer may end with every head the others gave up
        widest = min(self.full["heads"], heads * layers - (layers - 1))
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
        events = range(self.start_step + self.interval, self.end_step, self.interval)
        counts = {self.full["heads"], self.goal["heads"], *(self.keep_counts(s)["heads"] for s in events)}
        # units competing across layers can leave a layer any number of heads
        widths = sorted(
            c * head_size for c in (counts if self.same_per_layer else range(1, self.full["heads"] + 1))
        )
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

    def _resolve(self, kind: str, value: float | int) -> int:
        full = self.full[kind]
        keep = round(value * full) if isinstance(value, float) else int(value)
        if not 1 <= keep <= full:
            raise ValueError(
                f"target {kind}={value!r} keeps {keep} of {full} {kind} units; the student can keep "
                f"between 1 and {full} (a float is a fraction, an int a count)."
            )
        return keep

    def _apply(self, pl_module: L.LightningModule) -> None:
        """(Re-)install the mask hooks and zero what they remove, weights and their optimizer state alike."""
        student = pl_module.student
        if self._handle is not None:
            self._handle.remove()
        self._handle = apply_masks(student, self.masks)
        self._slices = [
            (piece.parameter, piece.dim, piece.index.to(piece.parameter.device))
            for piece in masked_parameter_slices(student, self.masks)
        ]
        zero_masked_(student, self.masks)
        trainer = pl_module._trainer
        for optimizer in trainer.optimizers if trainer is not None else []:
            for parameter, dim, index in self._slices:
                for value in optimizer.state.get(parameter, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == parameter.shape:
                        value.index_fill_(dim, index, 0.0)
        self._parameters = pruned_parameter_count(student, self.masks)
        self._widths = {
            f"width/{kind}": float(mask.sum()) / mask.numel() for kind, mask in self.masks.items()
        }
        self._widths["params"] = float(self._parameters)

    # ------------------------------------------------------------------------------------------ every step

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        with timed(pl_module, "pruning"):
            # Here the gradients are final: unscaled (16-mixed), accumulated over micro-batches, averaged by DDP.
            if trainer.global_step < self.end_step and any(
                p.grad is not None for p in pl_module.student.parameters()
            ):  # no gradients: a skipped step
                self.scorer.update(pl_module.student, _step_taken(trainer, optimizer))
            # Terms that read pruned units directly (q/k/v relations) would otherwise revive them.
            with torch.no_grad():
                for parameter, dim, index in self._slices:
                    if parameter.grad is not None:
                        parameter.grad.index_fill_(dim, index, 0.0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        due = step > self.start_step and (
            (step - self.start_step) % self.interval == 0 or step == self.end_step
        )
        if due and step <= self.end_step and step != self.last_event:
            with timed(pl_module, "pruning"):
                self._prune_event(trainer, pl_module, step)
        # Python floats become device tensors when logged (a blocking copy on a GPU): only where a logger reads.
        if trainer._logger_connector.should_update_logs:
            pl_module.log_dict(self.widths(), batch_size=1)

    def widths(self) -> dict[str, float]:
        """``width/<kind>``: the share of each kind that remains, and ``params``: the pruned model's size."""
        return dict(self._widths)

    def keep_counts(self, step: int) -> dict[str, int]:
        """How many units of each kind the schedule keeps after ``step`` (per layer for heads and FFN)."""
        span = max(self.end_step - self.start_step, 1)
        progress = min(max((step - self.start_step) / span, 0.0), 1.0)
        share = self.schedule(progress)
        keep = {}
        for kind, goal in self.goal.items():
            count = round(self.full[kind] - (self.full[kind] - goal) * share)
            multiple = self.granularity.get(kind, 1)
            if count > goal and multiple > 1:  # never below the target, which the last event reaches exactly
                count = min(self.full[kind], math.ceil(count / multiple) * multiple)
            keep[kind] = max(goal, count)
        return keep

    def _prune_event(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        scores = self.scorer.scores()
        if self.physical:  # the statistics cover the units the shrunk student still has
            scores = {kind: expand_scores(scores[kind], self.masks[kind]) for kind in self.goal}
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
        if self.physical:
            if any(
                not torch.equal(self.masks[kind], old[kind]) for kind in old
            ):  # a rounded schedule may wait
                self._shrink(trainer, pl_module, relative_masks(self.masks, old))
        else:
            self._apply(pl_module)
        self.events.append(
            {"step": step, **{k: int(v.sum()) for k, v in self.masks.items()}, "params": self._parameters}
        )

    def _shrink(self, trainer: L.Trainer, pl_module: L.LightningModule, relative: dict) -> None:
        """Remove the units ``relative`` (masks over the current student) drops, and carry everything along."""
        student = pl_module.student
        resizes = prune_model_(student, relative)
        if "hidden" in relative and not relative["hidden"].all():
            kept = relative["hidden"].nonzero().flatten()
            before = dict(pl_module.objective.named_parameters())
            pl_module.objective.narrow_student_width(kept)
            pl_module.objective.to(next(student.parameters()))  # maps it built sit with the student
            resizes += follow_width(before, dict(pl_module.objective.named_parameters()), kept)
        for optimizer in trainer.optimizers:
            reindex_optimizer_(optimizer, resizes)
        self.scorer.keep_units(relative)
        self._follow_shape(pl_module)
        _rewrap_ddp(trainer)

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
        if self.physical:  # already pruned; only the dropout goes back to plain transformers
            plain_dropout_(pl_module.student)
            return pl_module.student
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
        return {
            "target": self.target,
            "masks": self.masks,
            "importance": self.scorer.state_dict(),
            "last_event": self.last_event,
            "events": self.events,
            "end_step": self.end_step,
            "physical": self.physical,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
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
        if self.end_step is None:
            self.end_step = state_dict["end_step"]


def _rewrap_ddp(trainer: L.Trainer) -> None:
    """DDP registered the old parameters with its reducer: wrap the module again, on every rank at once.

    Every rank shrank at the same step to the same shapes (rank 0's decision was broadcast), so the new
    wrappers agree, and from here on only the kept parameters are all-reduced.
    """
    strategy = trainer.strategy
    if isinstance(strategy.model, torch.nn.parallel.DistributedDataParallel):
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()


def _step_taken(trainer: L.Trainer, optimizer: Any) -> torch.Tensor | None:
    """False (on the device, no sync) when a GradScaler will skip this step because its gradients overflowed."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None:
        return None
    found = scaler._found_inf_per_device(optimizer)  # filled by unscale_, which ran before this hook
    return ~torch.stack([v.reshape(()) for v in found.values()]).any().bool() if found else None


def _top_units_across_layers(scores: torch.Tensor, keep_per_layer: int) -> torch.Tensor:
    """Keep ``keep_per_layer * layers`` units wherever they score best, and at least one in every layer."""
    layers, width = scores.shape
    mask = top_units(scores.reshape(1, -1), keep_per_layer * layers).reshape(layers, width)
    best = scores.argmax(dim=1)
    mask[torch.arange(layers), best] = True
    return mask
