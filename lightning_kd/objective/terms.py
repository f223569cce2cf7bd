"""The knowledge terms of the KD-revisited grid: predictions, hidden states, embeddings, attention maps,
MiniLMv2 q/k/v relations, and the task loss."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kd.batch import IGNORE_INDEX
from lightning_kd.checks import check_number
from lightning_kd.objective.generative import chunked_cross_entropy, next_token_targets
from lightning_kd.objective.predictions import prediction_kl, prediction_mse, span_cross_entropy
from lightning_kd.objective.term import (
    Features,
    KnowledgeTerm,
    ModelInfo,
    Needs,
    masked_mean,
    register_term,
    resolve_layer_map,
)


@register_term
class PredictionKL(KnowledgeTerm):
    """The teacher's predictions as a target: KL(teacher || student) of the temperature-softened distributions,
    scaled by T² (Hinton et al.), or ``loss: mse`` between the raw logits (logit matching; for a one-output
    regression head such as STS-B's, the squared difference of the two scores).

    A one-output head has no distribution (its softmax is 1 whatever the score), so the KL would be 0 at every
    step: it is refused there, and the MSE has to be asked for by name.
    """

    kind = "logits"
    losses = ("kl", "mse")

    def __init__(self, temperature: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_number("temperature", temperature, low=0, low_open=True, finite=True)
        if self.loss == "mse" and temperature != 1:
            raise ValueError(
                f"the 'logits' term with loss 'mse' compares raw logits and has no temperature, got "
                f"temperature={temperature!r}: drop it, or use loss 'kl'."
            )
        self.temperature = float(temperature)

    def bind(self, teacher: ModelInfo, student: ModelInfo) -> None:
        if teacher.causal or student.causal:
            raise ValueError(
                "the 'logits' term would hold every position's vocabulary logits of a causal LM at once; use the "
                "'tokens' term, which distils next-token predictions a chunk of positions at a time (loss: "
                "forward_kl is this term's KL)."
            )
        for info in (teacher, student):
            if not info.predicts:
                raise ValueError(
                    f"the 'logits' term needs predictions, but the {info.name} has no prediction "
                    "head. Load it with a head (task: masked-lm, sequence-classification or question-answering), or "
                    "distil hidden states / relations instead."
                )
        if (
            None not in (teacher.num_outputs, student.num_outputs)
            and teacher.num_outputs != student.num_outputs
        ):
            raise ValueError(
                f"the 'logits' term compares predictions row by row, but the teacher predicts {teacher.num_outputs} "
                f"outputs and the student {student.num_outputs}: give the student the teacher's head (num_labels, "
                "vocabulary), or distil hidden states / relations instead."
            )
        if self.loss == "kl" and 1 in (teacher.num_outputs, student.num_outputs):
            raise ValueError(
                "the 'logits' term's KL is identically 0 on a one-output (regression, e.g. STS-B) head: the "
                "softmax of one score is always 1. Set loss: mse to match the two scores, or leave the logits "
                "term out (the TED authors' STS-B run, whose KL was 0, amounts to that)."
            )

    def needs(self) -> Needs:
        return Needs(logits=True)

    def forward(self, teacher: Features, student: Features, batch: Mapping[str, Tensor]) -> Tensor:
        if self.loss == "mse":
            return prediction_mse(teacher.logits, student.logits, batch, student.positions, student.spans)
        return prediction_kl(
            teacher.logits, student.logits, batch, self.temperature, student.positions, student.spans
        )


class _LayerTerm(KnowledgeTerm):
    """A term over pairs of layers."""

    with_embeddings: ClassVar[bool] = False
    default_layers: ClassVar[str] = "uniform"

    def __init__(self, layers: str | Sequence[Sequence[int]] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.layer_spec = layers if layers is not None else self.default_layers
        self.pairs: list[tuple[int, int]] = []

    def bind(self, teacher: ModelInfo, student: ModelInfo) -> None:
        self.pairs = resolve_layer_map(
            self.layer_spec, student.num_layers, teacher.num_layers, with_embeddings=self.with_embeddings
        )


def _projection(student_width: int, teacher_width: int) -> nn.Linear:
    """A learned map into the teacher's width; the identity where widths agree, so that a student that starts
    as the teacher (HomoDistil) starts with a zero loss rather than a random one."""
    linear = nn.Linear(student_width, teacher_width)
    if student_width == teacher_width:
        with torch.no_grad():
            linear.weight.copy_(torch.eye(teacher_width))
            linear.bias.zero_()
    return linear


@register_term
class HiddenState(_LayerTerm):
    """Distance between paired hidden states, through a learned linear projection when widths differ."""

    kind = "hidden"
    losses = ("mse", "cosine")
    with_embeddings = True

    def __init__(self, projection: bool | None = None, **kwargs: Any) -> None:
        if projection is not None and not isinstance(projection, bool):
            raise ValueError(
                f"projection must be true, false or left out (only when widths differ), got {projection!r}."
            )
        super().__init__(**kwargs)
        self.projection = projection
        self.teacher_width: int | None = None
        self.projections = nn.ModuleList()

    def bind(self, teacher: ModelInfo, student: ModelInfo) -> None:
        super().bind(teacher, student)
        self.teacher_width = teacher.hidden_size
        project = (
            self.projection if self.projection is not None else student.hidden_size != teacher.hidden_size
        )
        if not project and student.hidden_size != teacher.hidden_size:
            raise ValueError(
                f"term {self.name!r}: student width {student.hidden_size} differs from teacher "
                f"width {teacher.hidden_size}; leave `projection` unset or true."
            )
        self.projections = nn.ModuleList(
            [
                _projection(student.hidden_size, teacher.hidden_size) if project else nn.Identity()
                for _ in self.pairs
            ]
        )

    def needs(self) -> Needs:
        return Needs(hidden_states=True)

    @torch.no_grad()
    def narrow_student_width(self, kept: Tensor) -> None:
        """The student's residual stream now holds only the dimensions ``kept`` (it was physically pruned).

        Each projection keeps the columns that read them; an identity becomes the linear map that puts them
        back in place. Either way the term computes what it computed on the masked student.
        """
        for index, project in enumerate(self.projections):
            if isinstance(project, nn.Linear):
                # a learned projection keeps learning; the fixed map below stays fixed (a run shrinks many times)
                narrowed = nn.Linear(len(kept), project.out_features, bias=project.bias is not None)
                narrowed.to(project.weight)
                narrowed.weight.copy_(project.weight[:, kept.to(project.weight.device)])
                if project.bias is not None:
                    narrowed.bias.copy_(project.bias)
                narrowed.requires_grad_(project.weight.requires_grad)
            else:
                width = int(kept.max()) + 1 if self.teacher_width is None else self.teacher_width
                narrowed = nn.Linear(len(kept), width, bias=False).requires_grad_(False)
                narrowed.weight.zero_()
                narrowed.weight[kept, torch.arange(len(kept))] = 1.0
            self.projections[index] = narrowed

    def forward(self, teacher: Features, student: Features, batch: Mapping[str, Tensor]) -> Tensor:
        mask = batch["attention_mask"].bool()
        total = []
        for (s_layer, t_layer), project in zip(self.pairs, self.projections, strict=True):
            # in float32 whatever precision the models ran in: a bf16 difference of two near states is noise
            s = project(student.hidden_states[s_layer]).float()
            t = teacher.hidden_states[t_layer].float()
            if self.loss == "mse":
                per_token = (s - t).pow(2).mean(-1)
            else:
                per_token = 1.0 - F.cosine_similarity(s, t, dim=-1)
            total.append(masked_mean(per_token, mask))
        return torch.stack(total).mean()


@register_term
class Embeddings(HiddenState):
    """The embedding layer's output (hidden state 0), the TinyBERT embedding loss."""

    kind = "embeddings"
    losses = ("mse", "cosine")

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("layers", [[0, 0]])
        super().__init__(**kwargs)


@register_term
class AttentionMap(_LayerTerm):
    """Paired attention probabilities: KL per query row, or MSE; needs equal head counts."""

    kind = "attention"
    losses = ("kl", "mse")

    def bind(self, teacher: ModelInfo, student: ModelInfo) -> None:
        super().bind(teacher, student)
        for info in (teacher, student):
            if not info.can_return_attentions:
                raise ValueError(
                    f"the {info.name} cannot return attention maps, which term {self.name!r} needs. "
                    "Load it with attn_implementation='eager', or use the 'relations' term."
                )
        if teacher.num_heads != student.num_heads:
            raise ValueError(
                f"term {self.name!r} matches attention maps head by head, but the teacher has "
                f"{teacher.num_heads} heads and the student {student.num_heads}. Use the "
                "'relations' term (MiniLMv2), which works across head counts."
            )

    def needs(self) -> Needs:
        return Needs(attentions=True)

    def forward(self, teacher: Features, student: Features, batch: Mapping[str, Tensor]) -> Tensor:
        mask = batch["attention_mask"].bool()
        query_mask = mask[:, None, :]  # (B, 1, S): broadcast over heads
        total = []
        for s_layer, t_layer in self.pairs:
            s = student.attentions[s_layer - 1].float()
            t = teacher.attentions[t_layer - 1].float()
            if self.loss == "kl":
                per_row = (torch.special.xlogy(t, t) - t * s.clamp_min(1e-12).log()).sum(-1)
                total.append(masked_mean(per_row, query_mask.expand_as(per_row)))
            else:
                pair_mask = (mask[:, None, :, None] & mask[:, None, None, :]).expand_as(s)
                total.append(masked_mean((s - t).pow(2), pair_mask))
        return torch.stack(total).mean()


def relation_log_probs(states: Tensor, num_heads: int, key_mask: Tensor) -> Tensor:
    """MiniLMv2 self-relation: softmax over keys of scaled dot products, per relation head, as log-probs."""
    batch, seq, width = states.shape
    if width % num_heads:  # bind checked the widths it saw; a student pruned since may have others
        raise ValueError(
            f"{num_heads} relation heads do not divide a width of {width}: set num_relation_heads to a "
            "divisor of every query, key and value width the 'relations' term reads, all through the run."
        )
    head_size = width // num_heads
    x = states.float().view(batch, seq, num_heads, head_size).transpose(1, 2)
    scores = x @ x.transpose(-1, -2) / math.sqrt(head_size)
    scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return scores.log_softmax(-1)


@register_term
class Relations(_LayerTerm):
    """MiniLMv2 self-attention relations: KL between q-q, k-k and v-v relation maps.

    Queries, keys and values are split into the same number of relation heads on both sides, so teacher and
    student may differ in head count and width. Each relation compares a map with itself, so under grouped-query
    attention, where keys and values are narrower than queries, each role is split by its own width; the head
    count must divide every width read (checked when the term is bound).
    """

    kind = "relations"
    losses = ("kl",)
    default_layers = "last_layer"
    RELATIONS: ClassVar[dict[str, tuple[str, str]]] = {
        "qq": ("query", "query"),
        "kk": ("key", "key"),
        "vv": ("value", "value"),
    }

    def __init__(
        self,
        relations: Sequence[str] = ("qq", "kk", "vv"),
        num_relation_heads: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        unknown = [r for r in relations if r not in self.RELATIONS]
        if unknown or not relations:
            cross = [r for r in unknown if isinstance(r, str) and len(r) == 2 and set(r) <= set("qkv")]
            why = (
                f" Cross relations ({', '.join(cross)}) are not offered: MiniLMv2 distils self-relations, a q-k "
                "relation is the attention map (the 'attention' term), and under grouped-query attention keys "
                "and values are narrower than queries, so per relation head a query and a key differ in length."
                if cross
                else ""
            )
            raise ValueError(
                f"unknown relations {unknown or list(relations)}: choose from {', '.join(self.RELATIONS)}.{why}"
            )
        if num_relation_heads is not None:
            check_number(
                "num_relation_heads",
                num_relation_heads,
                low=1,
                integer=True,
                what="a whole number >= 1 (or left out: the teacher's head count)",
            )
        self.relations = list(relations)
        self.num_relation_heads = num_relation_heads

    def bind(self, teacher: ModelInfo, student: ModelInfo) -> None:
        super().bind(teacher, student)
        for info in (teacher, student):
            if not info.can_return_qkv:
                raise ValueError(
                    f"term {self.name!r} reads queries, keys and values, but lightning-kd does not "
                    f"know where the {info.name}'s are (unsupported architecture). Use 'hidden'."
                )
        heads = self.num_relation_heads or teacher.num_heads
        widths = self._widths_read(teacher, student)
        wrong = {where: width for where, width in widths.items() if width % heads}
        if wrong:
            common = math.gcd(*widths.values())
            divisors = [d for d in range(1, common + 1) if common % d == 0]
            found = ", ".join(f"{where}: {width}" for where, width in wrong.items())
            grouped = any(
                len(set(roles.values())) > 1 for info in (teacher, student) for roles in info.qkv_widths
            )
            why = (
                "; under grouped-query attention keys and values are narrower than queries" if grouped else ""
            )
            raise ValueError(
                f"term {self.name!r} splits every map it reads into {heads} relation heads, which do not divide "
                f"these widths ({found}{why}). Set num_relation_heads to one of {divisors}, which divide every "
                "width read" + (", or leave the narrow roles out of `relations`." if grouped else ".")
            )
        self.num_relation_heads = heads

    def _widths_read(self, teacher: ModelInfo, student: ModelInfo) -> dict[str, int]:
        """The width of every map the term reads, by where it is read (the hidden size where the widths of the
        maps are unknown)."""
        roles = {self.RELATIONS[relation][0] for relation in self.relations}
        widths = {}
        for info, layers in ((teacher, {t for _, t in self.pairs}), (student, {s for s, _ in self.pairs})):
            for layer in sorted(layers):
                known = info.qkv_widths[layer - 1] if len(info.qkv_widths) >= layer else {}
                for role in sorted(roles):
                    widths[f"{info.name} layer {layer} {role}"] = known.get(role, info.hidden_size)
        return widths

    def needs(self) -> Needs:
        return Needs(
            teacher_qkv_layers=frozenset(t for _, t in self.pairs),
            student_qkv_layers=frozenset(s for s, _ in self.pairs),
        )

    def forward(self, teacher: Features, student: Features, batch: Mapping[str, Tensor]) -> Tensor:
        mask = batch["attention_mask"].bool()
        query_mask = mask[:, None, :]
        total = []
        for s_layer, t_layer in self.pairs:
            for relation in self.relations:
                role = self.RELATIONS[relation][0]
                t = relation_log_probs(teacher.qkv[t_layer][role], self.num_relation_heads, mask)
                s = relation_log_probs(student.qkv[s_layer][role], self.num_relation_heads, mask)
                per_row = (t.exp() * (t - s)).sum(-1)
                total.append(masked_mean(per_row, query_mask.expand_as(per_row)))
        return torch.stack(total).mean()


@register_term
class TaskLoss(KnowledgeTerm):
    """The student's own loss on the labels: MLM cross-entropy, classification CE, regression MSE, or a QA
    head's mean of the start and end cross-entropies."""

    kind = "task"

    def __init__(self, chunk_size: int = 1024, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_number("chunk_size", chunk_size, low=1, integer=True)
        self.chunk_size = chunk_size  # positions per chunk of a causal LM's vocabulary logits
        self.causal = False

    def bind(self, teacher: ModelInfo, student: ModelInfo) -> None:
        if not student.predicts:
            raise ValueError(
                "the 'task' term needs a student with a prediction head (task: masked-lm, causal-lm, "
                "sequence-classification or question-answering)."
            )
        self.causal = student.causal

    def needs(self) -> Needs:
        # a causal LM's next-token loss reads the final hidden states and applies the head a chunk at a time
        return Needs(head_inputs=True) if self.causal else Needs(logits=True)

    def forward(self, teacher: Features, student: Features, batch: Mapping[str, Tensor]) -> Tensor:
        logits, labels = student.logits, batch.get("labels")
        if student.spans:
            return span_cross_entropy(logits, batch)
        if labels is None:
            raise ValueError("the 'task' term needs `labels` in the batch; the DataModule yields none.")
        if self.causal:
            targets = next_token_targets(labels, student.positions)
            return chunked_cross_entropy(student.head_input, student.head, targets, self.chunk_size)
        if logits.shape[-1] == 1 and labels.is_floating_point():
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        if student.positions is not None:  # predicted only where the labels are: read the labels there
            labels = labels.reshape(-1).index_select(0, student.positions)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX
        )
