"""TED's task-aware filters (Liang et al., ICML 2023): small maps on every k-th layer output, and their heads.

A filter reads one layer's hidden states (``[B, S, d_model]``) and writes ``[B, S, d_filter]``; the teacher's
and the student's filters share ``d_filter`` (the teacher's width by default), so their outputs compare
directly. In stage I each filter carries a task head and learns, with the model frozen, what in its layer
predicts the task; in stage II the heads are dropped and the filtered states are matched. The head is the
task's: for classification (GLUE) a pooler + linear on the first token (:class:`FilterHead`), for extractive
question answering (SQuAD) a per-token linear map to a start and an end score (:class:`SpanHead`). Which
one trained the filters is saved with them (``head``), so stage II and a resumed run can check it.

Layer numbers follow Hugging Face ``hidden_states``: 0 is the embedding output, ``i`` the output of block ``i``;
filters sit on blocks ``k, 2k, ..., L``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_kd.files import atomic_write, faults_named
from lightning_kd.training.provenance import check_made_with, model_record

FILTER_KINDS = ("linear", "mlp")
# "classifier": one prediction per example (GLUE); "span": a start and an end score per token (SQuAD).
HEAD_KINDS = ("classifier", "span")
FILTER_FORMAT = 1


def filter_layers(num_layers: int, interval: int, who: str = "model") -> list[int]:
    """The blocks that get a filter: ``interval, 2·interval, ..., num_layers``."""
    if interval < 1 or num_layers % interval:
        divisors = [d for d in range(1, num_layers + 1) if num_layers % d == 0]
        raise ValueError(
            f"TED filter interval {interval} does not divide the {who}'s {num_layers} layers, so the last "
            f"filter would not sit on the last layer; use one of {divisors}."
        )
    return list(range(interval, num_layers + 1, interval))


def filter_layer_pairs(
    teacher_layers: int, student_layers: int, interval: int = 1, student_interval: int | None = None
) -> list[tuple[int, int]]:
    """(student block, teacher block) pairs, one per filter.

    ``interval`` is the teacher's; the student's defaults to the one that gives it as many filters as the
    teacher (``student_layers · interval / teacher_layers``), which must be a whole number.
    """
    teacher = filter_layers(teacher_layers, interval, "teacher")
    if student_interval is None:
        if student_layers % len(teacher):
            raise ValueError(
                f"the teacher gets {len(teacher)} TED filters (every {interval} of {teacher_layers} layers), "
                f"which cannot be spread evenly over the student's {student_layers} layers; choose an "
                f"interval whose filter count divides {student_layers}, or set student_interval."
            )
        student_interval = student_layers // len(teacher)
    student = filter_layers(student_layers, student_interval, "student")
    if len(student) != len(teacher):
        raise ValueError(
            f"the teacher gets {len(teacher)} TED filters (interval {interval}) but the student "
            f"{len(student)} (student_interval {student_interval}); they are matched one to one, so choose "
            "intervals that give both the same count."
        )
    return list(zip(student, teacher, strict=True))


def _filter(in_width: int, out_width: int, kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_width, out_width)
    # Narrowing a pruned student's filter (narrow_input_width) assumes the first module reads the input.
    return nn.Sequential(nn.Linear(in_width, out_width), nn.GELU(), nn.Linear(out_width, out_width))


class LayerFilters(nn.Module):
    """One filter per listed layer, each mapping ``in_width`` to ``out_width``."""

    def __init__(self, layers: list[int], in_width: int, out_width: int, kind: str = "linear") -> None:
        super().__init__()
        if kind not in FILTER_KINDS:
            raise ValueError(f"unknown TED filter {kind!r}: use one of {', '.join(FILTER_KINDS)}.")
        self.layers = list(layers)
        self.in_width, self.out_width, self.kind = in_width, out_width, kind
        # The task head stage I trained them with (HEAD_KINDS); None for filters that never had one. Not part of
        # describe(): it says what the filters learned, not their shape.
        self.head: str | None = None
        self.filters = nn.ModuleList([_filter(in_width, out_width, kind) for _ in layers])

    @override
    def forward(self, hidden_states: tuple[Tensor, ...]) -> list[Tensor]:
        """The filtered output of every filtered layer, in ``layers`` order."""
        return [f(hidden_states[layer]) for f, layer in zip(self.filters, self.layers, strict=True)]

    @torch.no_grad()
    def narrow_input_width(self, kept: Tensor) -> None:
        """The model's residual stream now holds only the dimensions ``kept``: keep the columns that read them."""
        for index, module in enumerate(self.filters):
            first = module if isinstance(module, nn.Linear) else module[0]
            narrowed = nn.Linear(len(kept), first.out_features).to(first.weight)
            narrowed.weight.copy_(first.weight[:, kept.to(first.weight.device)])
            narrowed.bias.copy_(first.bias)
            narrowed.requires_grad_(first.weight.requires_grad)
            if isinstance(module, nn.Linear):
                self.filters[index] = narrowed
            else:
                module[0] = narrowed
        self.in_width = len(kept)

    def describe(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "in_width": self.in_width,
            "out_width": self.out_width,
            "kind": self.kind,
        }


class FilterHead(nn.Module):
    """A task head on a filter's output: pooler (dense + tanh on one token) and a linear classifier, as BERT and
    DeBERTa classify; one output means regression. The token is the first, or with ``last_token`` the last real
    one (``attention_mask``): a decoder's first token has seen only itself, its last the whole sequence, which
    is why decoder classifiers read it."""

    def __init__(self, width: int, num_labels: int, last_token: bool = False) -> None:
        super().__init__()
        self.pooler = nn.Linear(width, width)
        self.classifier = nn.Linear(width, num_labels)
        self.last_token = last_token

    @override
    def forward(self, filtered: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if self.last_token:
            if attention_mask is None:
                raise ValueError(
                    "a TED head on a decoder reads the last real token: pass the attention mask."
                )
            # the rightmost real position, whichever side the padding is on
            positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
            last = (attention_mask.bool() * positions).argmax(-1)
            pooled = filtered[torch.arange(filtered.shape[0], device=filtered.device), last]
        else:
            pooled = filtered[:, 0]
        return self.classifier(torch.tanh(self.pooler(pooled)))


class SpanHead(nn.Module):
    """A question-answering head on a filter's output: one linear map per token to a start and an end score,
    as Hugging Face's QA models read their last layer (and the TED authors' SQuAD filters theirs). Returns
    ``[B, 2, T]``, the layout :func:`~lightning_kd.objective.predictions.span_cross_entropy` takes."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.qa_outputs = nn.Linear(width, 2)

    @override
    def forward(self, filtered: Tensor) -> Tensor:
        return self.qa_outputs(filtered).transpose(1, 2)


def filter_head(head: str, width: int, num_labels: int, last_token: bool = False) -> nn.Module:
    """The task head of kind ``head`` (HEAD_KINDS) on a ``width``-wide filter output; ``last_token``: a
    classifier reads the last real token (a decoder's filters)."""
    if head not in HEAD_KINDS:
        raise ValueError(f"unknown TED head {head!r}: use one of {', '.join(HEAD_KINDS)}.")
    return SpanHead(width) if head == "span" else FilterHead(width, num_labels, last_token)


def save_filters(
    path: str | os.PathLike, filters: LayerFilters, made_with: nn.Module | None = None, **meta: Any
) -> str:
    """Write ``filters`` (weights, shape, and the head kind they were trained with) to ``path``; ``made_with``,
    the model whose layers they read, is recorded (:func:`~lightning_kd.training.provenance.model_record`) so that
    :func:`load_filters` refuses them for another model; ``meta`` records where they came from."""
    path = Path(path)
    with faults_named(path, "TED filters"):
        path.parent.mkdir(parents=True, exist_ok=True)
    record = model_record(made_with) if made_with is not None else None
    saved = {
        "format": FILTER_FORMAT,
        **filters.describe(),
        "head": filters.head,
        "made_with": record,
        "meta": meta,
    }
    with atomic_write(path, what="TED filters") as handle:
        torch.save({**saved, "state_dict": filters.state_dict()}, handle)
    return str(path)


def load_filters(
    path: str | os.PathLike, side: str = "model", made_with: nn.Module | None = None
) -> LayerFilters:
    """Filters written by :func:`save_filters` (stage I), or an error naming the stage that writes them; with
    ``made_with``, filters stage I learned on another model are refused, naming both."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no stage-I TED filters for the {side} at {path}. Run stage I first "
            "(TEDFilterCallback(stage='filters', save_dir=...)) and pass its save_dir as `filters`."
        )
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's message suggests weights_only=False, the wrong fix for a broken file
        raise ValueError(
            f"{path} cannot be read as TED filters ({type(error).__name__}): it is truncated or not a filter file. "
            "Run stage I again (TEDFilterCallback(stage='filters', save_dir=...)) to rewrite it."
        ) from None
    if not isinstance(saved, dict) or saved.get("format") != FILTER_FORMAT:
        raise ValueError(f"{path} is not a TED filter file written by lightning_kd.ted.filters.save_filters.")
    if made_with is not None:
        # filters map what one model's layers hold; another model of the same shape holds other things there
        check_made_with(
            saved.get("made_with"),
            made_with,
            f"the stage-I TED filters of the {side}",
            path,
            f"Run stage I (stage: {side if side in ('teacher', 'student') else 'filters'}) with this run's {side}, "
            f"or give this run the {side} stage I used.",
        )
    filters = LayerFilters(saved["layers"], saved["in_width"], saved["out_width"], saved["kind"])
    filters.load_state_dict(saved["state_dict"])
    # files from before question answering was supported were all trained with classifier heads
    filters.head = saved.get("head", "classifier")
    return filters
