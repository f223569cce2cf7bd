"""TED's terms (task-aware layer-wise distillation, Liang et al., ICML 2023).

The filters themselves are in ``lightning_kd/ted/filters.py``; ``TEDFilterCallback`` (``lightning_kd/ted/callback.py``) adds
these terms to the objective and moves the filters between the two stages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_kd.objective.predictions import span_cross_entropy
from lightning_kd.objective.term import Features, KnowledgeTerm, ModelInfo, Needs, masked_mean, register_term
from lightning_kd.ted.filters import HEAD_KINDS, LayerFilters, filter_head, filter_layer_pairs

TED_SIDES = ("teacher", "student")
# How the stage-II MSE is averaged over positions: "tokens" counts real tokens only; "authors" averages over
# every position of the padded batch, padding included, as the published code does (F.mse_loss with
# reduction="mean" over [batch, length, width]); their mse_alpha values were tuned with that average.
NORMALIZATIONS = ("tokens", "authors")


def _check_filter_width(width: int | None) -> None:
    if width is not None and int(width) < 1:
        raise ValueError(f"filter_width must be a positive number of dimensions, got {width}.")


@register_term
class FilterTaskLoss(KnowledgeTerm):
    """TED stage I: one side's filters, each with its own task head, trained on the task loss.

    The model itself is frozen by the caller; the value is the mean over filtered layers of the heads' loss.
    ``head="classifier"`` (GLUE): a pooler + linear classifier on the first token, cross-entropy against
    ``labels`` (MSE for a one-output regression task). ``head="span"`` (SQuAD): a per-token linear map to a
    start and an end score, the mean of the start and end cross-entropies against ``start_positions`` and
    ``end_positions`` (``num_labels`` is then unused).
    """

    kind = "ted_task"

    def __init__(
        self,
        side: str = "teacher",
        num_labels: int = 2,
        interval: int = 1,
        student_interval: int | None = None,
        filter: str = "linear",  # noqa: A002 - the YAML key users write
        filter_width: int | None = None,
        head: str = "classifier",
        **kwargs: Any,
    ) -> None:
        if side not in TED_SIDES:
            raise ValueError(f"term 'ted_task': side must be one of {', '.join(TED_SIDES)}, got {side!r}.")
        if int(num_labels) < 1:
            raise ValueError(
                f"term 'ted_task': num_labels must be >= 1 (1 for regression), got {num_labels}."
            )
        if head not in HEAD_KINDS:
            raise ValueError(
                f"term 'ted_task': head must be one of {', '.join(HEAD_KINDS)} (classifier for GLUE, span for "
                f"SQuAD), got {head!r}."
            )
        _check_filter_width(filter_width)
        kwargs.setdefault("name", f"ted_task_{side}")
        super().__init__(**kwargs)
        self.side, self.num_labels = side, int(num_labels)
        self.interval, self.student_interval = interval, student_interval
        self.filter_kind, self.filter_width = filter, filter_width
        self.head = head
        self.filters: nn.Module | None = None
        self.heads = nn.ModuleList()

    def bind(self, teacher: ModelInfo, student: ModelInfo) -> None:

        pairs = filter_layer_pairs(
            teacher.num_layers, student.num_layers, self.interval, self.student_interval
        )
        layers = [t if self.side == "teacher" else s for s, t in pairs]
        info = teacher if self.side == "teacher" else student
        width = self.filter_width or teacher.hidden_size
        self.filters = LayerFilters(layers, info.hidden_size, width, self.filter_kind)
        self.filters.head = self.head
        self.heads = nn.ModuleList(
            [filter_head(self.head, width, self.num_labels, info.reads_last_token) for _ in layers]
        )

    def needs(self) -> Needs:
        return Needs(hidden_states=True)

    @torch.no_grad()
    def narrow_student_width(self, kept: Tensor) -> None:
        if self.side == "student" and self.filters is not None:
            self.filters.narrow_input_width(kept)

    def forward(self, teacher: Features, student: Features, batch: Mapping[str, Tensor]) -> Tensor:
        features = teacher if self.side == "teacher" else student
        filtered_layers = self.filters(features.hidden_states)
        if self.head == "span":
            # Every position of the window competes, padding included, as in the QA models' own loss.
            return torch.stack(
                [
                    span_cross_entropy(head(f), batch)
                    for f, head in zip(filtered_layers, self.heads, strict=True)
                ]
            ).mean()
        labels = batch.get("labels")
        if labels is None:
            raise ValueError(
                "TED stage I trains filters on the task: the batch needs `labels` (a classification task; "
                "SQuAD batches train span heads, which TEDFilterCallback picks for question-answering models)."
            )
        losses = []
        for filtered, head in zip(filtered_layers, self.heads, strict=True):
            logits = head(filtered, batch.get("attention_mask")).float()
            if self.num_labels == 1:
                losses.append(F.mse_loss(logits.squeeze(-1), labels.float()))
            else:
                losses.append(F.cross_entropy(logits, labels.long()))
        return torch.stack(losses).mean()


@register_term
class FilteredHidden(KnowledgeTerm):
    """TED stage II: mean over filtered layers of the per-token MSE between f_s(H_s) and f_t(H_t).

    The teacher's filters are frozen; the student's train with the student. Both must come from stage I
    (:meth:`use_stage_one_filters`): matching through random filters would distil noise, so the term refuses
    to run without them.

    ``normalize`` picks the average over positions: ``"tokens"`` (real tokens only) or ``"authors"`` (every
    position of the padded batch, padding included, as in the published code; a batch padded further gives a
    smaller value, so the paper's mse_alpha values only carry over with this one).
    """

    kind = "ted"
    losses = ("mse",)

    def __init__(
        self,
        interval: int = 1,
        student_interval: int | None = None,
        filter: str = "linear",  # noqa: A002 - the YAML key users write
        filter_width: int | None = None,
        normalize: str = "tokens",
        **kwargs: Any,
    ) -> None:
        _check_filter_width(filter_width)
        if normalize not in NORMALIZATIONS:
            raise ValueError(
                f"term 'ted': normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r} "
                "('tokens': real tokens only; 'authors': padding included, as the paper's code averages)."
            )
        kwargs.setdefault("name", "ted")
        super().__init__(**kwargs)
        self.interval, self.student_interval = interval, student_interval
        self.filter_kind, self.filter_width = filter, filter_width
        self.normalize = normalize
        self.pairs: list[tuple[int, int]] = []
        self.teacher_filters: nn.Module | None = None
        self.student_filters: nn.Module | None = None
        # In the state dict, so a resumed run knows its filters came from stage I.
        self.register_buffer("from_stage_one", torch.tensor(False))

    def bind(self, teacher: ModelInfo, student: ModelInfo) -> None:

        self.pairs = filter_layer_pairs(
            teacher.num_layers, student.num_layers, self.interval, self.student_interval
        )
        width = self.filter_width or teacher.hidden_size
        self.teacher_filters = LayerFilters(
            [t for _, t in self.pairs], teacher.hidden_size, width, self.filter_kind
        )
        self.student_filters = LayerFilters(
            [s for s, _ in self.pairs], student.hidden_size, width, self.filter_kind
        )
        self.teacher_filters.requires_grad_(False)

    def use_stage_one_filters(self, teacher_filters: nn.Module, student_filters: nn.Module) -> None:
        """Take over the filters learned in stage I (checked against this term's layers and widths)."""
        for side, mine, theirs in (
            ("teacher", self.teacher_filters, teacher_filters),
            ("student", self.student_filters, student_filters),
        ):
            if mine.describe() != theirs.describe():
                raise ValueError(
                    f"the stage-I {side} filters {theirs.describe()} do not fit this run's {side} filters "
                    f"{mine.describe()}: run stage I with the same models, interval, filter and filter_width."
                )
            mine.load_state_dict(theirs.state_dict())
        self.teacher_filters.requires_grad_(False)
        self.from_stage_one.fill_(True)

    @override
    def train(self, mode: bool = True) -> FilteredHidden:
        super().train(mode)
        if self.teacher_filters is not None:
            self.teacher_filters.eval()  # frozen like the teacher, whatever Lightning switches
        return self

    def needs(self) -> Needs:
        return Needs(hidden_states=True)

    @torch.no_grad()
    def narrow_student_width(self, kept: Tensor) -> None:
        self.student_filters.narrow_input_width(kept)

    def forward(self, teacher: Features, student: Features, batch: Mapping[str, Tensor]) -> Tensor:
        if not bool(self.from_stage_one):
            raise RuntimeError(
                "the 'ted' term has no stage-I filters: run TED stage I (TEDFilterCallback(stage='filters', "
                "save_dir=...)) and add TEDFilterCallback(stage='distill', filters=<that save_dir>) to this run "
                "instead of declaring the term by hand."
            )
        mask = batch["attention_mask"].bool()
        if self.normalize == "authors":
            mask = torch.ones_like(mask)
        with torch.no_grad():
            targets = self.teacher_filters(teacher.hidden_states)
        total = []
        for s, t in zip(self.student_filters(student.hidden_states), targets, strict=True):
            total.append(masked_mean((s - t.to(s.dtype)).pow(2).mean(-1), mask))
        return torch.stack(total).mean()
