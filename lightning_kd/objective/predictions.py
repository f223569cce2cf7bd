"""Losses between predictions, shared by the logits and task terms and the discrepancy metrics: which rows of
logits a loss reads (MLM's masked tokens, a classifier's examples, a QA head's start and end distributions), the
softened KL, the logit MSE and a QA head's cross-entropy."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kd.batch import IGNORE_INDEX
from lightning_kd.objective.term import masked_mean

# a padding token's score in a QA head's distributions: exp() of it is 0 in float32, and unlike -inf it keeps
# 0 * log 0 terms finite
_OUTSIDE = -1e4


def _prediction_rows(
    logits: Tensor, batch: Mapping[str, Tensor], positions: Tensor | None, spans: bool = False
) -> tuple[Tensor, Tensor | None]:
    """The rows of logits a loss reads, as (rows, weights): MLM's masked tokens, else real tokens.

    Logits already gathered at ``positions`` and a classifier's one row per example are all read (weights None).
    Logits at every position are flattened and weighted by a 0/1 mask rather than indexed with it: boolean
    indexing needs the count of true entries, which on a GPU waits for the device. A QA head's start and end
    scores (``spans``) are two rows per example over the window's tokens, its padding scored out.
    """
    if spans:
        padding = ~batch["attention_mask"].bool()[:, None, :]
        return logits.masked_fill(padding, _OUTSIDE).reshape(-1, logits.shape[-1]), None
    if positions is not None or logits.dim() == 2:
        return logits, None
    labels = batch.get("labels")
    if labels is not None and labels.shape == logits.shape[:2]:
        keep = labels != IGNORE_INDEX
    else:
        keep = batch["attention_mask"].bool()
    return logits.reshape(-1, logits.shape[-1]), keep.reshape(-1)


def _row_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    return values.mean() if weights is None else masked_mean(values, weights)


def prediction_kl(
    teacher_logits: Tensor,
    student_logits: Tensor,
    batch: Mapping[str, Tensor],
    temperature: float,
    positions: Tensor | None = None,
    spans: bool = False,
) -> Tensor:
    """T² · KL(softmax(t / T) || softmax(s / T)) averaged over the predicted positions.

    ``positions``: the logits are already gathered there, one row each (see ``Features.positions``).
    ``spans``: they are a QA head's ``[B, 2, T]`` start and end scores; the KL is then the mean of the start and
    end distributions' KLs over the window's tokens, as in the HomoDistil and TED authors' SQuAD runs.
    """
    if teacher_logits.shape[-1] == 1:
        raise ValueError(
            "a KL between one-output (regression) predictions is identically 0: compare them with "
            "prediction_mse (the logits term's loss: mse)."
        )
    t, weights = _prediction_rows(teacher_logits, batch, positions, spans)
    s, _ = _prediction_rows(student_logits, batch, positions, spans)
    if t.numel() == 0:
        return student_logits.sum() * 0.0
    t, s = t.float(), s.float()
    if temperature != 1:  # each division is a pass over every row's vocabulary, forward and backward
        t, s = t / temperature, s / temperature
    teacher_prob = t.softmax(-1)
    # Soft cross-entropy has KL's gradient and skips a log on the teacher side's graph; adding back the teacher
    # entropy (no gradient) turns its value into the KL that users read on their dashboards.
    cross_entropy = -(teacher_prob * s.log_softmax(-1)).sum(-1)
    entropy = -torch.special.xlogy(teacher_prob, teacher_prob).sum(-1)
    return _row_mean(cross_entropy - entropy, weights) * temperature**2


def prediction_mse(
    teacher_logits: Tensor,
    student_logits: Tensor,
    batch: Mapping[str, Tensor],
    positions: Tensor | None = None,
    spans: bool = False,
) -> Tensor:
    """Mean over the predicted positions of the mean squared difference of the logits (of the scores, for a
    one-output regression head); positions and spans as in :func:`prediction_kl`."""
    t, weights = _prediction_rows(teacher_logits, batch, positions, spans)
    s, _ = _prediction_rows(student_logits, batch, positions, spans)
    if t.numel() == 0:
        return student_logits.sum() * 0.0
    return _row_mean((s.float() - t.float()).pow(2).mean(-1), weights)


def span_cross_entropy(logits: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """The mean of the start and end cross-entropies of a QA head's ``[B, 2, T]`` logits against the batch's
    ``start_positions`` and ``end_positions`` (CLS, 0, where the window holds no answer), as Hugging Face's
    QA models compute their loss."""
    if "start_positions" not in batch or "end_positions" not in batch:
        raise ValueError(
            "a question-answering loss needs `start_positions` and `end_positions` in the batch; "
            "SQuADDataModule yields them."
        )
    targets = torch.stack([batch["start_positions"], batch["end_positions"]], dim=1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1).long())
