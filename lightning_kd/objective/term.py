"""The pieces every knowledge term shares: what it reads (Features), what it asks for (Needs), what it knows of
the two models (ModelInfo), layer maps, and the term registry."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn
from typing_extensions import override

from lightning_kd.checks import is_number


@dataclass
class ModelInfo:
    """What the objective needs to know of a model before training starts."""

    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int
    predicts: bool  # whether the model has a prediction head (logits)
    can_return_attentions: bool = True
    can_return_qkv: bool = True
    name: str = "model"
    num_outputs: int | None = (
        None  # logits per row: num_labels of a classifier (1 = regression), else the vocabulary
    )
    causal: bool = False  # a causal LM: predicts the next token at every position
    # a decoder (causal attention): only its last real token has seen the whole sequence, so a head that reads
    # one position per example reads that one (a decoder classifier's own head does)
    reads_last_token: bool = False
    # per block (index = block - 1): the output width of the query, key and value maps, which differ from the
    # hidden size when the head size is stored, and from each other under grouped-query attention
    qkv_widths: tuple[dict[str, int], ...] = ()


@dataclass
class Features:
    """The outputs of one forward pass that the terms read; fields are None when nobody asked for them.

    ``positions``: when set, the model predicted only at these positions (flat indices into batch x sequence,
    see :func:`prediction_positions`) and ``logits`` holds one row per position, in that order; when None,
    ``logits`` covers every position (batch, sequence, vocabulary) or is one row per example (a classifier).
    ``spans``: ``logits`` are a question-answering head's ``[batch, 2, sequence]`` start and end scores, two
    distributions over the window's tokens per example.
    """

    logits: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    qkv: dict[int, dict[str, Tensor]] = field(default_factory=dict)  # 1-based block -> {"query": ...}
    positions: Tensor | None = None
    spans: bool = False
    # a causal LM's final hidden states at ``positions`` and the head that maps them to the vocabulary, for the
    # terms that apply the head a chunk of rows at a time instead of reading ``logits``
    head_input: Tensor | None = None
    head: Callable[[Tensor], Tensor] | None = None

    def float(self) -> Features:
        """The same outputs in float32 (free when they already are): losses are computed at full precision."""

        def up(value: Any) -> Any:
            if isinstance(value, tuple):
                return tuple(v.float() for v in value)
            return None if value is None else value.float()

        return Features(
            logits=up(self.logits),
            hidden_states=up(self.hidden_states),
            attentions=up(self.attentions),
            qkv={layer: {k: v.float() for k, v in parts.items()} for layer, parts in self.qkv.items()},
            positions=self.positions,
            spans=self.spans,
            # kept in the model's precision: the head it feeds runs in that precision, and the losses that
            # read it compute their softmaxes in float32 a chunk at a time
            head_input=self.head_input,
            head=self.head,
        )


@dataclass(frozen=True)
class Needs:
    """Which outputs to ask of teacher and student."""

    logits: bool = False
    hidden_states: bool = False
    attentions: bool = False
    teacher_qkv_layers: frozenset[int] = frozenset()
    student_qkv_layers: frozenset[int] = frozenset()
    head_inputs: bool = False  # a causal LM's final hidden states at the positions read, and its head

    def __or__(self, other: Needs) -> Needs:
        return Needs(
            self.logits or other.logits,
            self.hidden_states or other.hidden_states,
            self.attentions or other.attentions,
            self.teacher_qkv_layers | other.teacher_qkv_layers,
            self.student_qkv_layers | other.student_qkv_layers,
            self.head_inputs or other.head_inputs,
        )


# ---------------------------------------------------------------------------------------------- layer maps

LAYER_MAPS = ("first", "last", "uniform", "first_layer", "last_layer")


def resolve_layer_map(
    spec: str | Sequence[Sequence[int]], student_layers: int, teacher_layers: int, *, with_embeddings: bool
) -> list[tuple[int, int]]:
    """(student, teacher) layer pairs for a named map or an explicit list of pairs.

    The maps of "KD revisited" (Lu et al., 2022), for M student and N teacher layers: ``first`` pairs student
    layer m with teacher layer m, ``last`` with teacher layer N - M + m (all M layers, each time), and
    ``uniform`` is TinyBERT's map, student layer m learning from teacher layer m * N / M (for hidden states it
    also pairs the embeddings, 0 with 0). ``first_layer`` and ``last_layer`` are one pair each: (1, 1) and
    (M, N), the last one being MiniLMv2's relation map.
    """
    first = 0 if with_embeddings else 1
    if isinstance(spec, str):
        if spec in ("first", "last") and student_layers > teacher_layers:
            raise ValueError(
                f"layer map {spec!r} pairs each of the student's {student_layers} layers with its "
                f"own teacher layer, but the teacher has only {teacher_layers}; use 'uniform'."
            )
        if spec == "first":
            return [(m, m) for m in range(1, student_layers + 1)]
        if spec == "last":
            return [(m, teacher_layers - student_layers + m) for m in range(1, student_layers + 1)]
        if spec == "first_layer":
            return [(1, 1)]
        if spec == "last_layer":
            return [(student_layers, teacher_layers)]
        if spec == "uniform":
            return [(m, round(m * teacher_layers / student_layers)) for m in range(first, student_layers + 1)]
        raise ValueError(
            f"unknown layer map {spec!r}: use one of {', '.join(LAYER_MAPS)} or a list of "
            "[student_layer, teacher_layer] pairs."
        )
    if not isinstance(spec, Sequence):
        raise ValueError(
            f"layer map {spec!r} is neither a name ({', '.join(LAYER_MAPS)}) nor a list of pairs."
        )
    pairs = []
    for pair in spec:
        if (
            isinstance(pair, str)
            or not isinstance(pair, Sequence)
            or len(pair) != 2
            or not all(is_number(x, integer=True) for x in pair)
        ):
            raise ValueError(
                f"layer map entry {pair!r} of {list(spec)!r} must be a [student_layer, teacher_layer] pair of "
                "integers, e.g. layers: [[1, 2], [2, 4]] (a flat list like [2, 4] is not a map)."
            )
        pairs.append(tuple(pair))
        for side, index, total in (
            ("student", pair[0], student_layers),
            ("teacher", pair[1], teacher_layers),
        ):
            if not first <= index <= total:
                valid = f"{first}..{total}" + (" (0 = embeddings)" if with_embeddings else "")
                raise ValueError(
                    f"layer map pair {list(pair)} names {side} layer {index}, which does not exist: "
                    f"the {side} has layers {valid}."
                )
    if not pairs:
        raise ValueError("an explicit layer map needs at least one [student_layer, teacher_layer] pair.")
    return pairs  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- the terms

TERMS: dict[str, type[KnowledgeTerm]] = {}


def register_term(cls: type[KnowledgeTerm]) -> type[KnowledgeTerm]:
    TERMS[cls.kind] = cls
    return cls


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is true (``values`` has the mask's shape)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


class KnowledgeTerm(nn.Module):
    """One weighted piece of the objective. Subclasses set ``kind`` and implement ``needs`` and ``forward``."""

    kind: ClassVar[str]
    losses: ClassVar[tuple[str, ...]] = ()

    def __init__(self, weight: float = 1.0, name: str | None = None, loss: str | None = None) -> None:
        super().__init__()
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(
                f"term {self.kind!r} has weight {weight!r}: a weight is a number, e.g. 1.0."
            ) from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(
                f"term {self.kind!r} has weight {weight}: weights must be finite and >= 0 "
                "(set 0 to switch a term off while still logging it)."
            )
        if loss is not None and loss not in self.losses:
            raise ValueError(
                f"term {self.kind!r} has no loss {loss!r}: choose one of {', '.join(self.losses)}."
            )
        self.weight = weight
        self.loss = loss or (self.losses[0] if self.losses else None)
        self.name = name or (f"{self.kind}_{self.loss}" if self.loss else self.kind)

    def bind(self, teacher: ModelInfo, student: ModelInfo) -> None:
        """Check the term against both models and create what it learns (projections)."""

    def needs(self) -> Needs:
        raise NotImplementedError

    @override
    def forward(self, teacher: Features, student: Features, batch: Mapping[str, Tensor]) -> Tensor:
        raise NotImplementedError
