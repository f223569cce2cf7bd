"""Next-token distillation losses for decoder LMs: per-position divergences between the teacher's and the
student's next-token distributions, and a chunked form that never holds a whole batch of vocabulary logits.

A decoder's vocabulary (32k for Llama 2 and Mistral, 128k for Llama 3, 152k for Qwen) makes the logits the
largest tensors of a step: 4096 positions x 152k float32 logits are 2.5 GB per model, before the softmaxes,
their gradients and the teacher's copy. :func:`chunked_token_loss` applies the two prediction heads to a chunk
of rows at a time and recomputes each chunk in backward, so peak memory follows the chunk, not the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lightning_kd.batch import IGNORE_INDEX
from lightning_kd.checks import check_number
from lightning_kd.objective.term import Features, KnowledgeTerm, ModelInfo, Needs, register_term

TOKEN_LOSSES = ("forward_kl", "reverse_kl", "jsd", "topk")

Head = Callable[[Tensor], Tensor]


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per row, from log-probabilities. Entries where p is 0 count 0 even where log p or log q is
    -inf (a vocabulary slot masked with -inf logits), where p * (log p - log q) alone would give nan."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logits lose the small probabilities a KL sums over; float64 (tests, gradcheck) is kept as is
    return torch.promote_types(dtype, torch.float32)


def _check_settings(loss: str, temperature: float, beta: float, top_k: int | None) -> None:
    if loss not in TOKEN_LOSSES:
        raise ValueError(f"unknown token loss {loss!r}: use one of {', '.join(map(repr, TOKEN_LOSSES))}.")
    check_number("temperature", temperature, low=0, low_open=True, finite=True)
    check_number(
        "beta",
        beta,
        low=0,
        high=1,
        hint=" (the teacher's share of the jsd mixture: 0 is forward KL, 1 reverse KL)",
    )
    if loss == "topk":
        if top_k is None:
            raise ValueError("loss 'topk' needs top_k, the number of teacher tokens it reads: set top_k.")
        check_number("top_k", top_k, low=1, integer=True)
    elif top_k is not None:
        raise ValueError(
            f"top_k is read only by loss 'topk', got top_k={top_k!r} with loss {loss!r}: drop top_k."
        )


def _check_logits(teacher: torch.Size, student: torch.Size, top_k: int | None) -> None:
    if len(teacher) == 0 or teacher != student:
        hint = ""
        if len(teacher) and len(student) and teacher[:-1] == student[:-1]:
            hint = (
                " The vocabularies differ: models of one family can pad their embedding matrices to different "
                "sizes; slice both logits to the tokenizer's vocabulary (logits[..., :len(tokenizer)])."
            )
        raise ValueError(
            f"teacher and student logits must have the same shape [..., vocabulary], got teacher {list(teacher)} "
            f"and student {list(student)}: give both the rows of the same positions." + hint
        )
    if top_k is not None and top_k > teacher[-1]:
        raise ValueError(
            f"top_k must be at most the vocabulary size {teacher[-1]}, got {top_k}: lower top_k "
            f"(top_k={teacher[-1]} reads every token and equals forward_kl)."
        )


def token_divergence(
    teacher_logits: Tensor,
    student_logits: Tensor,
    loss: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    top_k: int | None = None,
) -> Tensor:
    """The divergence between the teacher's and the student's next-token distributions, one value per row.

    ``teacher_logits`` and ``student_logits`` are ``[..., V]`` (typically ``[N, V]``, one row per position a
    loss reads); the result has the leading shape (``[N]``). Both sides are softened by ``temperature`` and
    the result is scaled by T², as Hinton et al. do, so that its gradients keep their size when T changes.
    The softmaxes run in float32 at least (bf16 and fp16 logits are upcast; float64 stays float64). The
    teacher's logits are not detached: pass them without a graph (the teacher is frozen).

    Losses, with t = softmax(teacher / T) and s = softmax(student / T):

    - ``"forward_kl"``: KL(t || s), Hinton's distillation loss: mean-seeking, the student spreads over every
      token the teacher gives mass to.
    - ``"reverse_kl"``: KL(s || t), mode-seeking: the student is penalised for mass where the teacher has
      little, as in MiniLLM (Gu et al., ICLR 2024).
    - ``"jsd"``: the generalized Jensen-Shannon divergence of GKD (Agarwal et al., ICLR 2024, Eq. 1), in the
      convention of TRL's ``GKDTrainer.generalized_jsd_loss``: with the mixture m = beta·t + (1 - beta)·s,
      JSD_beta = beta·KL(t || m) + (1 - beta)·KL(s || m). ``beta`` is the teacher's share of the mixture.
      beta = 0.5 is the ordinary, symmetric JSD. At the ends the formula itself vanishes (m becomes one of
      the two distributions), so, as in TRL, beta = 0 is defined as forward KL(t || s) and beta = 1 as reverse
      KL(s || t): near 0, JSD_beta ≈ beta·KL(t || s), and near 1, JSD_beta ≈ (1 - beta)·KL(s || t).
    - ``"topk"``: only the teacher's ``top_k`` largest logits are read, the form a cache of top-k teacher
      logits allows (DistillKit, Minitron-style logit caches). The target q is the teacher's softmax
      renormalised over its k tokens; the student's log-probabilities are its full log-softmax (over the
      whole vocabulary) gathered at those k ids, so the loss is sum_k q·(log q - log s). It is not a KL
      between two distributions over the k tokens: with a student equal to the teacher it is -log of the
      student's mass on the k tokens (0 only when k = V, where it is forward KL), which pushes the student's
      mass into the teacher's top k.

    Raises:
        ValueError: an unknown ``loss``, logits of different shapes, ``temperature`` <= 0, ``beta`` outside
            [0, 1], ``top_k`` missing, < 1 or > V with ``"topk"``, or given with another loss.
    """
    _check_settings(loss, temperature, beta, top_k)
    _check_logits(teacher_logits.shape, student_logits.shape, top_k)
    dtype = _compute_dtype(torch.promote_types(teacher_logits.dtype, student_logits.dtype))
    teacher, student = teacher_logits.to(dtype), student_logits.to(dtype)
    if temperature != 1:
        # skipped at T = 1: each division is one more [N, V] copy
        teacher, student = teacher / temperature, student / temperature
    if loss == "topk":
        values, ids = teacher.topk(top_k, dim=-1)
        divergence = _kl(values.log_softmax(-1), student.log_softmax(-1).gather(-1, ids))
        return divergence * temperature**2
    log_t = teacher.log_softmax(-1)
    log_s = student.log_softmax(-1)
    if loss == "forward_kl" or (loss == "jsd" and beta == 0):
        divergence = _kl(log_t, log_s)
    elif loss == "reverse_kl" or (loss == "jsd" and beta == 1):
        divergence = _kl(log_s, log_t)
    else:
        log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
        divergence = beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)
    return divergence * temperature**2


def chunked_token_loss(
    teacher_hidden: Tensor,
    student_hidden: Tensor,
    teacher_head: Head,
    student_head: Head,
    weights: Tensor | None = None,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    top_k: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """The mean :func:`token_divergence` over rows of final hidden states, without the full logits.

    ``teacher_hidden`` ``[N, Ht]`` and ``student_hidden`` ``[N, Hs]`` are the rows a loss reads (e.g. the
    positions whose next token is distilled); ``teacher_head`` and ``student_head`` map rows of hidden states to
    vocabulary logits (a model's ``lm_head``, or a norm followed by it). ``weights`` ``[N]`` (non-negative, e.g.
    a 0/1 mask) turn the mean over rows into a weighted mean (0 where all weights are 0).

    ``chunk_size`` rows at a time, the teacher's logits are computed under ``no_grad`` and the student's inside
    ``torch.utils.checkpoint``: backward recomputes each chunk's logits (the teacher's too, rather than keeping
    every chunk's teacher logits until backward), so peak memory holds about one chunk of ``[chunk_size, V]``
    logits and their softmaxes, for one extra pass of both heads over the rows. The value and the gradients
    (to ``student_hidden`` and the student head's parameters) are those of the unchunked computation.
    """
    if teacher_hidden.dim() != 2 or student_hidden.dim() != 2 or len(teacher_hidden) != len(student_hidden):
        raise ValueError(
            f"teacher_hidden and student_hidden must be [N, hidden] with the same N (one row per position), got "
            f"{list(teacher_hidden.shape)} and {list(student_hidden.shape)}: flatten batch and sequence "
            "(hidden.reshape(-1, hidden.shape[-1])) and select the same positions on both sides."
        )
    rows = len(student_hidden)
    if weights is not None and weights.shape != (rows,):
        raise ValueError(
            f"weights must be one value per row, shape [{rows}], got {list(weights.shape)}: flatten them the way "
            "the hidden states are flattened."
        )
    check_number("chunk_size", chunk_size, low=1, integer=True)
    _check_settings(loss, temperature, beta, top_k)

    def chunk_loss(teacher_rows: Tensor, student_rows: Tensor, chunk_weights: Tensor | None) -> Tensor:
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_rows)
        student_logits = student_head(student_rows)
        values = token_divergence(teacher_logits, student_logits, loss, temperature, beta, top_k)
        return values.sum() if chunk_weights is None else (values * chunk_weights).sum()

    if rows == 0:
        # a graph-connected zero, so that backward reaches the student as usual
        return student_head(student_hidden).sum() * 0.0
    weights = None if weights is None else weights.to(_compute_dtype(weights.dtype))
    recompute = torch.is_grad_enabled()
    total = None
    for start in range(0, rows, chunk_size):
        stop = min(start + chunk_size, rows)
        chunk = (
            teacher_hidden[start:stop],
            student_hidden[start:stop],
            None if weights is None else weights[start:stop],
        )
        part = checkpoint(chunk_loss, *chunk, use_reentrant=False) if recompute else chunk_loss(*chunk)
        total = part if total is None else total + part
    if weights is None:
        return total / rows
    # all-zero weights give 0 (every term is weighted 0), not 0 / 0
    return total / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)


def chunked_cross_entropy(
    hidden: Tensor, head: Head, targets: Tensor, chunk_size: int = 1024, reduction: str = "mean"
) -> Tensor:
    """Cross-entropy of ``head(hidden)`` ``[N, V]`` against ``targets`` ``[N]`` (ignoring -100), a chunk of rows
    at a time and recomputed in backward as in :func:`chunked_token_loss`: the causal LM's own loss, and the
    negative log-likelihood behind perplexity, without the full logits. ``reduction`` ``"sum"`` gives the summed
    log-likelihood (for averaging over a whole evaluation)."""
    check_number("chunk_size", chunk_size, low=1, integer=True)

    def chunk_loss(rows: Tensor, chunk_targets: Tensor) -> Tensor:
        logits = head(rows)
        return torch.nn.functional.cross_entropy(
            logits.float(), chunk_targets, ignore_index=IGNORE_INDEX, reduction="sum"
        )

    recompute = torch.is_grad_enabled()
    total = head(hidden[:0]).sum() * 0.0  # graph-connected, for batches without a target
    for start in range(0, len(hidden), chunk_size):
        chunk = (hidden[start : start + chunk_size], targets[start : start + chunk_size])
        total = total + (
            checkpoint(chunk_loss, *chunk, use_reentrant=False) if recompute else chunk_loss(*chunk)
        )
    if reduction == "sum":
        return total
    return total / (targets != IGNORE_INDEX).sum().clamp_min(1)


def next_token_targets(labels: Tensor, positions: Tensor) -> Tensor:
    """The token each flattened position (``positions``, indices into batch x sequence) predicts: the label one
    step later in its row, -100 at a row's last position. Labels are unshifted, as Hugging Face causal LMs take
    them (the model shifts inside its own loss; here the rows are read one by one, so the shift is made here)."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    return shifted.reshape(-1).index_select(0, positions)


@register_term
class NextTokenDistillation(KnowledgeTerm):
    """Next-token distillation for causal LMs: a divergence between the teacher's and the student's next-token
    distributions at every position a loss reads (``loss``: ``forward_kl``, ``reverse_kl``, ``jsd`` with
    ``beta``, or ``topk`` with ``top_k``; see :func:`token_divergence`), computed a ``chunk_size`` of positions at
    a time from the final hidden states, so that no batch x length x vocabulary float32 tensor is ever built.

    A teacher and student of one family whose vocabularies differ only by padding rows (Qwen2.5-7B's head has
    152,064 rows, 0.5B's 151,936, for the same 151,665 tokens) are compared over the rows both have: the
    module refuses data whose tokenizer reaches past them.
    """

    kind = "tokens"
    losses = TOKEN_LOSSES

    def __init__(
        self,
        temperature: float = 1.0,
        beta: float = 0.5,
        top_k: int | None = None,
        chunk_size: int = 1024,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_settings(self.loss, temperature, beta, top_k)
        check_number("chunk_size", chunk_size, low=1, integer=True)
        self.temperature, self.beta, self.top_k, self.chunk_size = (
            float(temperature),
            float(beta),
            top_k,
            chunk_size,
        )
        self.vocabulary: int | None = None

    def bind(self, teacher: ModelInfo, student: ModelInfo) -> None:
        for info in (teacher, student):
            if not info.causal:
                raise ValueError(
                    f"the 'tokens' term distils next-token predictions, but the {info.name} is not a causal LM: "
                    "load both with task: causal-lm, or use the 'logits' term for masked LMs and classifiers."
                )
        self.vocabulary = min(teacher.num_outputs, student.num_outputs)
        if self.top_k is not None and self.top_k > self.vocabulary:
            raise ValueError(
                f"top_k={self.top_k} is larger than the vocabulary ({self.vocabulary}): lower it."
            )

    def needs(self) -> Needs:
        return Needs(head_inputs=True)

    def forward(self, teacher: Features, student: Features, batch: Mapping[str, Tensor]) -> Tensor:
        vocabulary = self.vocabulary

        def narrow(head: Head) -> Head:
            # padding rows past the shared vocabulary are no token of either tokenizer
            return lambda rows: head(rows)[..., :vocabulary]

        return chunked_token_loss(
            teacher.head_input,
            student.head_input,
            narrow(teacher.head),
            narrow(student.head),
            loss=self.loss,
            temperature=self.temperature,
            beta=self.beta,
            top_k=self.top_k,
            chunk_size=self.chunk_size,
        )
