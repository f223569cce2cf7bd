"""From a SQuAD model's start and end logits over windows to each question's answer text.

A question whose context is longer than a window is split into several overlapping windows; each window
scores every token as an answer's start and end. The answer is the best-scoring valid span over all of a
question's windows: its start among the window's ``n_best`` best starts, its end among the ``n_best`` best
ends, ``start <= end``, at most ``max_answer_length`` tokens, both inside the context. SQuAD v2.0 adds the
null answer, scored ``start_logit[CLS] + end_logit[CLS]`` (its smallest value over the question's windows):
the answer is ``""`` when the null score beats the best span by more than ``null_score_diff_threshold``.

`postprocess` does this for all windows at once with tensor operations; `postprocess_reference` is the
per-window loop of the Hugging Face question-answering examples, kept as the definition the tests and the
benchmark compare against. Where the examples answer ``"empty"`` because no span is valid, both answer ``""``
(and, for v2.0, give infinite null odds): a made-up word would be scored as a real prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class SquadAnswers:
    """Each question's answer text by id and, for v2.0, its null odds (null score - best span score): the
    ``--na-prob-file`` of the official evaluation script, ``null_odds`` of `squad_v2_scores`."""

    answers: dict[str, str]
    null_odds: dict[str, float] = field(default_factory=dict)


def postprocess(
    start_logits: Tensor,
    end_logits: Tensor,
    offsets: Tensor,
    window_question: Tensor | Sequence[int],
    contexts: Sequence[str],
    ids: Sequence[str],
    *,
    context_mask: Tensor | None = None,
    n_best: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
    null_score_diff_threshold: float = 0.0,
    cls_index: int = 0,
) -> SquadAnswers:
    """Answers for ``len(ids)`` questions from ``W`` windows of ``T`` tokens, all windows at once.

    ``start_logits``, ``end_logits``: ``[W, T]``; ``offsets``: ``[W, T, 2]``, each token's character span in
    its question's context, ``(-1, -1)`` outside the context unless ``context_mask`` (``[W, T]``, true on
    context tokens) says which tokens may be part of an answer; ``window_question``: ``[W]``, the index into
    ``ids`` and ``contexts`` of each window's question.
    """
    start, end, offsets, question, mask = _checked(
        start_logits, end_logits, offsets, window_question, contexts, ids, context_mask, n_best
    )
    windows, tokens = start.shape
    k = min(n_best, tokens)
    start_score, start_index = start.topk(k, dim=1)
    end_score, end_index = end.topk(k, dim=1)
    # a candidate outside the context can be in no span: scoring it -inf rules out all its pairs at once
    start_score = start_score.masked_fill(~mask.gather(1, start_index), float("-inf"))
    end_score = end_score.masked_fill(~mask.gather(1, end_index), float("-inf"))
    # every (start, end) pair of the window's candidates, [W, k, k] in the order the reference loop takes
    # them; int16 token indices, since memory traffic over the pairs is most of the time
    small = torch.int16 if tokens <= torch.iinfo(torch.int16).max else torch.int64
    length = end_index.to(small)[:, None, :] - start_index.to(small)[:, :, None]
    pair_score = start_score[:, :, None] + end_score[:, None, :]
    # no span is longer than the window: the clamp keeps the bound inside int16
    pair_score.masked_fill_((length < 0) | (length >= min(max_answer_length, tokens)), float("-inf"))
    window_best, flat = pair_score.view(windows, k * k).max(dim=1)
    window_start = start_index.gather(1, (flat // k)[:, None]).squeeze(1)
    window_end = end_index.gather(1, (flat % k)[:, None]).squeeze(1)

    count = len(ids)
    best = torch.full((count,), float("-inf"), dtype=start.dtype).scatter_reduce(
        0, question, window_best, "amax"
    )
    # the first window reaching its question's best, as a stable sort of the candidates would keep it
    reaches = (window_best == best[question]) & torch.isfinite(window_best)
    window_numbers = torch.arange(windows)
    chosen = torch.full((count,), windows).scatter_reduce(
        0, question, torch.where(reaches, window_numbers, windows), "amin"
    )
    found = chosen < windows
    chosen = chosen.clamp(max=windows - 1)
    char_start = offsets[chosen, window_start[chosen], 0].tolist()
    char_end = offsets[chosen, window_end[chosen], 1].tolist()
    null = None
    if version_2:
        window_null = start[:, cls_index] + end[:, cls_index]
        null = torch.full((count,), float("inf"), dtype=start.dtype).scatter_reduce(
            0, question, window_null, "amin"
        )
    return _answers(
        ids,
        contexts,
        found.tolist(),
        char_start,
        char_end,
        best.tolist(),
        null,
        version_2,
        null_score_diff_threshold,
    )


def postprocess_reference(
    start_logits: Tensor,
    end_logits: Tensor,
    offsets: Tensor,
    window_question: Tensor | Sequence[int],
    contexts: Sequence[str],
    ids: Sequence[str],
    *,
    context_mask: Tensor | None = None,
    n_best: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
    null_score_diff_threshold: float = 0.0,
    cls_index: int = 0,
) -> SquadAnswers:
    """`postprocess` as the Hugging Face examples write it: for each question, a loop over its windows, the
    window's ``n_best`` starts and ends by ``argsort``, a double loop over their pairs, the candidates sorted."""
    start, end, offsets, question, mask = _checked(
        start_logits, end_logits, offsets, window_question, contexts, ids, context_mask, n_best
    )
    start, end, offsets, mask = start.numpy(), end.numpy(), offsets.numpy(), mask.numpy()
    windows_of: dict[int, list[int]] = {index: [] for index in range(len(ids))}
    for window, index in enumerate(question.tolist()):
        windows_of[index].append(window)
    answers, null_odds = {}, {}
    for index, qid in enumerate(ids):
        min_null = None
        candidates = []
        for window in windows_of[index]:
            null_score = start[window][cls_index] + end[window][cls_index]
            if min_null is None or null_score < min_null:
                min_null = null_score
            start_indexes = np.argsort(start[window])[-1 : -n_best - 1 : -1].tolist()
            end_indexes = np.argsort(end[window])[-1 : -n_best - 1 : -1].tolist()
            for start_index in start_indexes:
                for end_index in end_indexes:
                    if not mask[window, start_index] or not mask[window, end_index]:
                        continue
                    if end_index < start_index or end_index - start_index + 1 > max_answer_length:
                        continue
                    score = start[window][start_index] + end[window][end_index]
                    candidates.append((score, offsets[window, start_index, 0], offsets[window, end_index, 1]))
        candidates = sorted(candidates, key=lambda candidate: candidate[0], reverse=True)[:n_best]
        text = contexts[index][int(candidates[0][1]) : int(candidates[0][2])] if candidates else ""
        if version_2:
            best = float(candidates[0][0]) if candidates else float("-inf")
            null_odds[qid] = float(min_null) - best
            if null_odds[qid] > null_score_diff_threshold:
                text = ""
        answers[qid] = text
    return SquadAnswers(answers, null_odds)


def _answers(
    ids: Sequence[str],
    contexts: Sequence[str],
    found: list[bool],
    char_start: list[int],
    char_end: list[int],
    best: list[float],
    null: Tensor | None,
    version_2: bool,
    threshold: float,
) -> SquadAnswers:
    answers, null_odds = {}, {}
    nulls = null.tolist() if null is not None else None
    for index, qid in enumerate(ids):
        text = contexts[index][char_start[index] : char_end[index]] if found[index] else ""
        if nulls is not None:
            # in float64, as the reference subtracts Python floats: the same odds to the last bit
            null_odds[qid] = nulls[index] - best[index]
            if null_odds[qid] > threshold:
                text = ""
        answers[qid] = text
    return SquadAnswers(answers, null_odds if version_2 else {})


def _checked(
    start_logits: Tensor,
    end_logits: Tensor,
    offsets: Tensor,
    window_question: Tensor | Sequence[int],
    contexts: Sequence[str],
    ids: Sequence[str],
    context_mask: Tensor | None,
    n_best: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The inputs on the CPU in float32 (float64 kept) and int64, their shapes checked, the context mask."""
    start = torch.as_tensor(start_logits).detach().cpu()
    end = torch.as_tensor(end_logits).detach().cpu()
    start = start if start.dtype == torch.float64 else start.float()
    end = end.to(start.dtype)
    offsets = torch.as_tensor(offsets).detach().cpu().long()
    question = torch.as_tensor(window_question).detach().cpu().long()
    if start.dim() != 2 or end.shape != start.shape:
        raise ValueError(
            f"start and end logits must both be [windows, tokens], got {start.shape} and {end.shape}"
        )
    if offsets.shape != (*start.shape, 2):
        raise ValueError(
            f"offsets must be [windows, tokens, 2] = {(*start.shape, 2)}, got {tuple(offsets.shape)}"
        )
    if question.shape != start.shape[:1]:
        raise ValueError(
            f"window_question must give one question per window ({start.shape[0]}), got {question.shape}"
        )
    if len(contexts) != len(ids):
        raise ValueError(f"{len(ids)} ids but {len(contexts)} contexts")
    if n_best < 1:
        raise ValueError(f"n_best must be at least 1, got {n_best}")
    if question.numel() and (question.min() < 0 or question.max() >= len(ids)):
        raise ValueError(f"window_question must index the {len(ids)} questions")
    without = (torch.bincount(question, minlength=len(ids)) == 0).nonzero().flatten().tolist()
    if without:
        raise ValueError(f"{len(without)} questions have no window, e.g. {[ids[i] for i in without[:3]]}")
    if context_mask is None:
        mask = offsets[..., 0] >= 0
    else:
        mask = torch.as_tensor(context_mask).detach().cpu().bool()
        if mask.shape != start.shape:
            raise ValueError(
                f"context_mask must be [windows, tokens] = {tuple(start.shape)}, got {mask.shape}"
            )
    return start, end, offsets, question, mask
