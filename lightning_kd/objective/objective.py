"""The objective: a weighted sum of knowledge terms built from their YAML form."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from typing_extensions import override

from lightning_kd.objective.term import TERMS, Features, KnowledgeTerm, ModelInfo, Needs


def build_term(spec: Mapping[str, Any] | KnowledgeTerm) -> KnowledgeTerm:
    """A term from its YAML form, e.g. ``{"term": "hidden", "loss": "cosine", "layers": "last_layer"}``."""
    if isinstance(spec, KnowledgeTerm):
        return spec
    options = dict(spec)
    kind = options.pop("term", None)
    if kind not in TERMS:
        raise ValueError(f"unknown knowledge term {kind!r}: known terms are {', '.join(sorted(TERMS))}.")
    try:
        return TERMS[kind](**options)
    except TypeError as error:
        raise ValueError(
            f"term {kind!r}: {error}. See {TERMS[kind].__name__} in {TERMS[kind].__module__.replace('.', '/')}.py "
            "for its options."
        ) from error


class DistillationObjective(nn.Module):
    """The weighted sum of knowledge terms; every term's value is returned for logging."""

    def __init__(self, terms: Sequence[Mapping[str, Any] | KnowledgeTerm]) -> None:
        super().__init__()
        if not terms:
            raise ValueError(
                "the objective needs at least one term, e.g. [{term: hidden}] or [{term: logits}]."
            )
        built = [build_term(t) for t in terms]
        names = [t.name for t in built]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"several terms are named {duplicates}: give each a distinct `name`.")
        self.terms = nn.ModuleDict({t.name: t for t in built})

    def bind(self, teacher: ModelInfo, student: ModelInfo) -> None:
        for term in self.terms.values():
            term.bind(teacher, student)

    def needs(self) -> Needs:
        needs = Needs()
        for term in self.terms.values():
            needs = needs | term.needs()
        return needs

    def narrow_student_width(self, kept: Tensor) -> None:
        """Tell every term that reads the student's residual stream that only the dimensions ``kept`` remain."""
        for term in self.terms.values():
            narrow = getattr(term, "narrow_student_width", None)
            if narrow is not None:
                narrow(kept)

    def follow_student_width(self, kept: Tensor, like: nn.Module) -> None:
        """The student now keeps only the residual dimensions ``kept``: narrow the terms that read them, and put
        what they rebuilt where the student ``like`` lives (its device and dtype)."""
        self.narrow_student_width(kept)
        self.to(next(like.parameters()))

    @override
    def forward(
        self, teacher: Features, student: Features, batch: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        values = {name: term(teacher, student, batch) for name, term in self.terms.items()}
        total = sum(self.terms[name].weight * value for name, value in values.items())
        return total, values
