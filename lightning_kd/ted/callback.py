"""TEDFilterCallback: task-aware layer-wise distillation (TED, Liang et al., ICML 2023) in two stages.

Stage I (``stage="filters"``, or ``"teacher"`` / ``"student"`` for one side): both models frozen, a filter on
every k-th layer of each, each filter with its own task head, trained on the task loss; the filters are saved
to ``save_dir`` (``teacher.pt``, ``student.pt``) when fit ends.

Stage II (``stage="distill"``): the stage-I filters are loaded from ``filters``; the teacher's are frozen,
the student's train with the student, and the objective gains ``weight`` x mean over filtered layers of
MSE(f_s(H_s), f_t(H_t)) (the ``ted`` term). The rest of the objective is the recipe's: TED's is
``task`` + ``logits`` (kl_alpha, T = 2) + ``ted`` (mse_alpha).

The task heads of stage I are the task's: on classification (GLUE: a classifier teacher and student, a
GLUEDataModule) a pooler + linear classifier on the first token of each filter's output; on extractive question
answering (SQuAD: ``task="question-answering"`` models, a SQuADDataModule) a per-token linear map to a start and
an end score, trained with the QA loss on ``start_positions`` / ``end_positions``, as the authors' SQuAD runs do.
The callback reads the kind from the DataModule's task and the models' heads, refuses a mix (a classifier
teacher on SQuAD data, a QA teacher on GLUE), and saves it with the filters and in its checkpoint state, so that
stage II and a resumed run refuse filters learned on the other kind of task. Stage II is the same for both.

Both stages run inside :class:`~lightning_kd.DistillationModule`: the callback adds its terms to the objective in
``setup``, before the optimizer is built, so the filters are parameters of the module, in its checkpoints and,
for the student's, in its optimizer. The teacher's filters are in the checkpoint too (they are the stage-I
result, not the teacher) but never in the optimizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from typing_extensions import override

from lightning_kd.datamodules.squad_tasks import SquadTask
from lightning_kd.distillation.contract import require_run
from lightning_kd.models.info import model_info
from lightning_kd.models.layers import is_classifier, is_question_answering
from lightning_kd.ted.filters import filter_layer_pairs, load_filters, save_filters
from lightning_kd.ted.terms import NORMALIZATIONS, FilteredHidden, FilterTaskLoss

_HEAD_WORDS = {
    "classifier": "classifier heads (classification, GLUE)",
    "span": "span heads (question answering, SQuAD)",
}
STAGES = {"filters": ("teacher", "student"), "teacher": ("teacher",), "student": ("student",), "distill": ()}


class TEDFilterCallback(L.Callback):
    """Drives TED's two stages on a :class:`~lightning_kd.DistillationModule` with ``task="sequence-classification"``
    (GLUE: classifier heads on the filters) or ``task="question-answering"`` (SQuAD: start/end span heads).

    Args:
        stage: ``filters`` (stage I for teacher and student in one run), ``teacher`` or ``student`` (stage I
            for one side), or ``distill`` (stage II).
        filters: stage II: the folder stage I saved the filters to.
        save_dir: stage I: where to save them (default ``<trainer.default_root_dir>/ted_filters``).
        interval: a filter on every ``interval``-th teacher block (it must divide the teacher's layer count).
        student_interval: the student's; by default the one giving the student as many filters as the teacher.
        filter: ``linear`` (the paper's) or ``mlp`` (linear, GELU, linear).
        filter_width: the filters' output width, shared by both sides (default: the teacher's hidden size).
        weight: stage II: the weight of the filtered-hidden term (the paper's mse_alpha).
        normalize: stage II: how the filtered MSE averages over positions: ``tokens`` (real tokens only) or
            ``authors`` (padding included, as the published code does; the paper's mse_alpha values were tuned
            with it, so the paper recipes set it).
        num_labels: classification only: the task's label count (1 for regression); by default the DataModule's
            task's. Question answering has none to set (its heads score a start and an end per token).
    """

    def __init__(
        self,
        stage: str = "filters",
        filters: str | None = None,
        save_dir: str | None = None,
        interval: int = 1,
        student_interval: int | None = None,
        filter: str = "linear",  # noqa: A002 - the YAML key users write
        filter_width: int | None = None,
        weight: float = 1.0,
        normalize: str = "tokens",
        num_labels: int | None = None,
    ) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown TED stage {stage!r}: use one of {', '.join(STAGES)}.")
        if normalize not in NORMALIZATIONS:
            raise ValueError(
                f"unknown TED normalize {normalize!r}: use 'tokens' (the filtered MSE over real tokens only) or "
                "'authors' (over every padded position, as the paper's code and its mse_alpha values)."
            )
        if stage == "distill" and filters is None:
            raise ValueError(
                "TED stage II (stage='distill') matches the student to the teacher through the filters learned "
                "in stage I, but `filters` is not set: run stage='filters' first and pass its save_dir."
            )
        self.stage, self.filters, self.save_dir = stage, filters, save_dir
        self.options = {
            "interval": int(interval),
            "student_interval": student_interval,
            "filter": filter,
            "filter_width": filter_width,
        }
        self.weight, self.num_labels, self.normalize = float(weight), num_labels, normalize
        self.saved: dict[str, str] = {}
        self.head: str | None = None  # the task heads' kind (HEAD_KINDS), known in setup
        self._missing: FileNotFoundError | None = None

    @override
    @property
    def state_key(self) -> str:
        return f"TEDFilterCallback[stage={self.stage}]"

    @property
    def term_names(self) -> list[str]:
        return [f"ted_task_{side}" for side in STAGES[self.stage]] if self.stage != "distill" else ["ted"]

    # ------------------------------------------------------------------------------------------ set-up

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_run(pl_module, "TEDFilterCallback")
        terms = pl_module.objective.terms
        if all(name in terms for name in self.term_names):
            return  # a second fit / validate with the same module: the terms are already there
        clash = [name for name, term in terms.items() if term.kind in ("ted", "ted_task")]
        if clash:
            raise ValueError(
                f"the objective already holds TED terms {clash}; TEDFilterCallback adds its own, so remove them "
                "from the recipe's objective."
            )
        teacher, student = model_info(pl_module.teacher, "teacher"), model_info(pl_module.student, "student")
        causal = [info.name for info in (teacher, student) if info.causal]
        if causal:
            raise ValueError(
                f"TED learns its filters through task heads that classify a sequence or score answer spans, but "
                f"the {' and the '.join(causal)} {'is a causal LM' if len(causal) == 1 else 'are causal LMs'}, "
                "whose task is next-token prediction: TED has no filter head for it. Distil causal LMs with the "
                "'tokens' and 'hidden' terms, or run TED on decoders fine-tuned for the task "
                "(task='sequence-classification' or 'question-answering')."
            )
        # Checked here, before any term is built, so a bad interval names itself rather than a term.
        filter_layer_pairs(
            teacher.num_layers, student.num_layers, self.options["interval"], self.options["student_interval"]
        )
        self.head = self._task_head(trainer, pl_module)
        num_labels = self._check_labels(trainer, pl_module) if self.head == "classifier" else 2
        if self.stage == "distill":
            self._add_distill_term(pl_module, teacher, student)
        else:
            self._prepare_stage_one(pl_module, teacher, student, num_labels)
        rank_zero_info(f"TED stage {self.stage!r}: terms {self.term_names} added to the objective.")
        self._time_filters(pl_module)

    def _time_filters(self, pl_module: L.LightningModule) -> None:
        """Count the TED terms' time (filters, their heads and losses) as the step's ``filters`` share."""
        timer = getattr(pl_module, "step_timer", None)
        if timer is None:
            return
        for name in self.term_names:
            term = pl_module.objective.terms[name]
            term.register_forward_pre_hook(
                lambda module, args: timer.start("filters") if module.training else None
            )
            term.register_forward_hook(lambda module, args, out: timer.stop("filters"))

    def _task_head(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        """``span`` for question answering, ``classifier`` otherwise, once the data and both models agree."""
        spans: dict[str, bool] = {}
        task = getattr(getattr(trainer, "datamodule", None), "task", None)
        if task is not None:
            spans[f"the DataModule's task {getattr(task, 'name', task)!r}"] = isinstance(task, SquadTask)
        for side in ("teacher", "student"):
            model = getattr(pl_module, side)
            if is_question_answering(model) or is_classifier(model):
                spans[f"the {side} ({type(model).__name__})"] = is_question_answering(model)
        if len(set(spans.values())) > 1:
            found = "; ".join(
                f"{who}: {'question answering (spans)' if span else 'classification'}"
                for who, span in spans.items()
            )
            raise ValueError(
                f"TED trains task heads on the filters, but the task is not one kind throughout: {found}. For "
                "SQuAD, use a SQuADDataModule with question-answering teacher and student "
                "(DistillationModule(task='question-answering'), the teacher fine-tuned with "
                "FineTuningModule(task='squad_v2')); for GLUE, a GLUEDataModule with classifiers "
                "(task='sequence-classification')."
            )
        span = any(spans.values())
        if span and self.num_labels is not None:
            raise ValueError(
                f"num_labels={self.num_labels} is for classification, but this TED run is question answering, "
                "whose stage-I heads score a start and an end per token: leave num_labels unset."
            )
        return "span" if span else "classifier"

    def _check_labels(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        """The task's label count, after checking that every head in play fits it."""
        task = getattr(getattr(trainer, "datamodule", None), "task", None)
        counts = {"the DataModule's task": getattr(task, "num_labels", None), "num_labels": self.num_labels}
        for side in ("teacher", "student"):
            model = getattr(pl_module, side)
            if is_classifier(model):
                counts[f"the {side}'s classifier"] = model.config.num_labels
        known = {where: n for where, n in counts.items() if n is not None}
        if not known:
            raise ValueError(
                "TED trains task heads but cannot tell the task: use a GLUEDataModule or a sequence-classification "
                "teacher, or set num_labels (1 for regression), for classification; a SQuADDataModule or "
                "question-answering teacher and student for question answering."
            )
        if len(set(known.values())) > 1:
            found = ", ".join(f"{where}: {n}" for where, n in known.items())
            raise ValueError(
                f"the heads do not fit the task's number of labels ({found}). Fine-tune the teacher on this "
                "task, and build the student from it (init: copy / layers / extract) or name a pre-trained "
                "student, which lightning-kd loads with a fresh head of the teacher's label count."
            )
        return next(iter(known.values()))

    def _prepare_stage_one(
        self, pl_module: L.LightningModule, teacher: Any, student: Any, num_labels: int
    ) -> None:
        # The models are frozen, and so is whatever the recipe's own terms learn (projections): stage I trains
        # the filters and their heads and nothing else. The recipe's terms stay, weight 0, still logged.
        pl_module.student.requires_grad_(False)
        for term in pl_module.objective.terms.values():
            term.requires_grad_(False)
            term.weight = 0.0
        for side in STAGES[self.stage]:
            term = FilterTaskLoss(side=side, num_labels=num_labels, head=self.head, **self.options)
            term.bind(teacher, student)
            pl_module.objective.terms[term.name] = term

    def _add_distill_term(self, pl_module: L.LightningModule, teacher: Any, student: Any) -> None:
        term = FilteredHidden(weight=self.weight, normalize=self.normalize, **self.options)
        term.bind(teacher, student)
        folder = Path(self.filters)
        files = {side: folder / f"{side}.pt" for side in ("teacher", "student")}
        try:
            loaded = {
                side: load_filters(path, side, getattr(pl_module, side)) for side, path in files.items()
            }
        except FileNotFoundError as error:
            # A resumed run finds its filters in the checkpoint, which Lightning restores only after setup;
            # on_fit_start checks that one of the two supplied them, before the first step.
            self._missing = error
        else:
            for side, filters in loaded.items():
                if filters.head not in (None, self.head):
                    raise ValueError(
                        f"the stage-I {side} filters at {files[side]} were trained with {_HEAD_WORDS.get(filters.head, filters.head)}, "
                        f"but this run distils with {_HEAD_WORDS[self.head]}: filters learn what predicts their "
                        "own task, so run stage I on this run's task and data and pass that save_dir as `filters`."
                    )
            term.use_stage_one_filters(loaded["teacher"], loaded["student"])
        pl_module.objective.terms[term.name] = term

    def _check_filters_arrived(self, pl_module: L.LightningModule) -> None:
        terms = pl_module.objective.terms
        if self.stage == "distill" and "ted" in terms and not bool(terms["ted"].from_stage_one):
            raise self._missing or RuntimeError("the 'ted' term has no stage-I filters.")

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_filters_arrived(pl_module)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_filters_arrived(pl_module)

    # ------------------------------------------------------------------------------------------ training

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.stage != "distill" and pl_module.student.training:
            # frozen means frozen: no dropout in the states the student's filters learn from
            pl_module.student.eval()

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stage != "distill":
            self._save(trainer, pl_module)

    @rank_zero_only
    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = Path(self.save_dir or Path(trainer.default_root_dir) / "ted_filters")
        for side in STAGES[self.stage]:
            term = pl_module.objective.terms[f"ted_task_{side}"]
            model = getattr(pl_module, side)
            self.saved[side] = save_filters(
                folder / f"{side}.pt",
                term.filters,
                made_with=model,
                model=getattr(model.config, "_name_or_path", ""),
                model_type=model.config.model_type,
                num_labels=term.num_labels if term.head == "classifier" else None,
                interval=self.options["interval"],
                student_interval=self.options["student_interval"],
                steps=trainer.global_step,
            )
        rank_zero_info(f"TED stage I filters saved: {self.saved}")

    # ------------------------------------------------------------------------------------------ checkpoints

    @override
    def state_dict(self) -> dict[str, Any]:
        # The filters themselves are module parameters (objective terms), so they are in the checkpoint's
        # state_dict; this records what produced them.
        return {
            "stage": self.stage,
            **self.options,
            "filters": self.filters,
            "normalize": self.normalize,
            "head": self.head,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        head = state_dict.get("head") or "classifier"  # checkpoints from before question answering: GLUE
        if self.head is not None and head != self.head:
            raise ValueError(
                f"this checkpoint's TED run trained {_HEAD_WORDS[head]}, but this run is set up for "
                f"{_HEAD_WORDS[self.head]}: resume it with the task, models and data it was started with, or "
                "start a new run."
            )
        changed = {
            k: (v, self.options[k])
            for k, v in state_dict.items()
            if k in self.options and self.options[k] != v
        }
        if changed:
            rank_zero_warn(
                f"this checkpoint's TED filters were built with other options {changed} (saved, now); the "
                "module's state will not fit them."
            )
        saved = state_dict.get(
            "normalize", "tokens"
        )  # checkpoints from before the option averaged over tokens
        if self.stage == "distill" and saved != self.normalize:
            rank_zero_warn(
                f"this checkpoint's TED run averaged the filtered MSE with normalize={saved!r}, this run with "
                f"{self.normalize!r}: the 'ted' term changes scale from here on. Set normalize={saved!r} to "
                "resume the same run."
            )
