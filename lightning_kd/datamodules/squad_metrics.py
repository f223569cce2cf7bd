"""SQuAD's official metrics: exact match and token F1, as the v1.1 and v2.0 evaluation scripts compute them.

The numbers must be comparable with published results, so every quirk of the official scripts is kept:
v1.1 scores a missing prediction 0 and two answers that normalise to nothing 0; v2.0 drops gold answers that
normalise to nothing (an unanswerable question's gold is ``[""]``), scores two empty answers 1, and searches
the best no-answer threshold over the questions in ascending order of their null odds.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
import torchmetrics
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.utilities import dim_zero_cat

from lightning_kd.datamodules.squad_postprocess import SquadAnswers, postprocess
from lightning_kd.datamodules.squad_tasks import SquadReference

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, the articles a/an/the removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> int:
    """1 when both answers normalise to the same text, else 0."""
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str, *, empty_agree: bool = True) -> float:
    """F1 of the two answers' bags of normalised tokens.

    When either normalises to no token, v2.0 scores 1 if both do and 0 otherwise (``empty_agree=True``);
    v1.1's script scores every answer pair without a common token 0, two empty ones included.
    """
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if empty_agree and (not pred_tokens or not gold_tokens):
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_v1_scores(predictions: Mapping[str, str], golds: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """``{"exact_match", "f1"}`` in percent over every question of ``golds`` (id -> its gold answer texts).

    As in ``evaluate-v1.1.py``, a question without a prediction scores 0 and still counts; predictions for
    questions not in ``golds`` are ignored.
    """
    if not golds:
        raise ValueError("squad_v1_scores needs at least one question in golds")
    exact = f1 = 0.0
    for qid, answers in golds.items():
        if qid not in predictions:
            continue
        prediction = predictions[qid]
        exact += max(exact_match(prediction, gold) for gold in answers)
        f1 += max(f1_score(prediction, gold, empty_agree=False) for gold in answers)
    return {"exact_match": 100.0 * exact / len(golds), "f1": 100.0 * f1 / len(golds)}


def squad_v2_scores(
    predictions: Mapping[str, str],
    golds: Mapping[str, Sequence[str]],
    null_odds: Mapping[str, float] | None = None,
    threshold: float = 1.0,
) -> dict[str, float]:
    """The keys and values ``evaluate-v2.0.py`` prints: ``exact``, ``f1``, ``total``, their ``HasAns_`` and
    ``NoAns_`` versions (when the split has such questions) and, given ``null_odds``, ``best_exact``,
    ``best_exact_thresh``, ``best_f1`` and ``best_f1_thresh``.

    ``golds`` maps a question id to its gold answer texts, an empty list for an unanswerable question.
    ``null_odds`` (id -> how much more likely no answer is; the script's ``--na-prob-file``) turns a question
    whose odds exceed ``threshold`` into a no-answer prediction before scoring, as ``--na-prob-thresh`` does.
    Every question needs a prediction (the official script fails without one).
    """
    if not golds:
        raise ValueError("squad_v2_scores needs at least one question in golds")
    missing = [qid for qid in golds if qid not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} questions have no prediction, e.g. {missing[:3]}")
    if null_odds is not None:
        missing = [qid for qid in golds if qid not in null_odds]
        if missing:
            raise ValueError(f"{len(missing)} questions have no null odds, e.g. {missing[:3]}")
    has_answer = {qid: bool(answers) for qid, answers in golds.items()}
    exact_raw: dict[str, float] = {}
    f1_raw: dict[str, float] = {}
    for qid, answers in golds.items():
        # a gold that normalises to nothing cannot be matched by a span; the script scores against "" instead
        texts = [text for text in answers if normalize_answer(text)] or [""]
        prediction = predictions[qid]
        exact_raw[qid] = float(max(exact_match(prediction, gold) for gold in texts))
        f1_raw[qid] = max(f1_score(prediction, gold) for gold in texts)
    odds = null_odds if null_odds is not None else {}
    exact = _apply_null_threshold(exact_raw, odds, has_answer, threshold)
    f1 = _apply_null_threshold(f1_raw, odds, has_answer, threshold)
    out = _summary(exact, f1, list(golds))
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        qids = [qid for qid, has in has_answer.items() if has is wanted]
        if qids:
            out.update({f"{prefix}_{key}": value for key, value in _summary(exact, f1, qids).items()})
    if null_odds is not None:
        out["best_exact"], out["best_exact_thresh"] = _best_threshold(
            predictions, exact_raw, null_odds, has_answer
        )
        out["best_f1"], out["best_f1_thresh"] = _best_threshold(predictions, f1_raw, null_odds, has_answer)
    return out


def _apply_null_threshold(
    scores: dict[str, float], odds: Mapping[str, float], has_answer: dict[str, bool], threshold: float
) -> dict[str, float]:
    return {
        qid: float(not has_answer[qid]) if odds.get(qid, 0.0) > threshold else score
        for qid, score in scores.items()
    }


def _summary(exact: dict[str, float], f1: dict[str, float], qids: list[str]) -> dict[str, float]:
    total = len(qids)
    return {
        "exact": 100.0 * sum(exact[qid] for qid in qids) / total,
        "f1": 100.0 * sum(f1[qid] for qid in qids) / total,
        "total": total,
    }


def _best_threshold(
    predictions: Mapping[str, str],
    scores: dict[str, float],
    odds: Mapping[str, float],
    has_answer: dict[str, bool],
) -> tuple[float, float]:
    """The best score over thresholds on the null odds, and that threshold (``find_best_thresh``).

    Starting from "every question answered with no answer", raising the threshold past a question's odds
    lets its prediction through: an answerable one gains its score, an unanswerable one loses its point when
    the prediction is not empty. Questions are taken in ascending order of odds, ties in ``odds``' order.
    """
    score = best = float(sum(not has for has in has_answer.values()))
    best_threshold = 0.0
    for qid in sorted(odds, key=lambda key: odds[key]):
        if qid not in scores:
            continue
        if has_answer[qid]:
            score += scores[qid]
        elif predictions[qid]:
            score -= 1
        if score > best:
            best, best_threshold = score, odds[qid]
    return 100.0 * best / len(scores), float(best_threshold)


class _Windows(torchmetrics.Metric):
    """Each evaluated window's index and start and end logits, gathered from every rank by ``compute``."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("windows", default=[], dist_reduce_fx="cat")
        self.add_state("logits", default=[], dist_reduce_fx="cat")

    def update(self, windows: Tensor, logits: Tensor) -> None:
        self.windows.append(windows)
        self.logits.append(logits)

    def compute(self) -> tuple[Tensor, Tensor]:
        return dim_zero_cat(self.windows), dim_zero_cat(self.logits)


class SquadMetrics(nn.Module):
    """SQuAD's official scores of a model's start and end logits on a split's windows, as one module a
    LightningModule owns (the counterpart of GLUE's ``TaskMetrics``).

    ``update`` takes ``[B, 2, T]`` logits (start, end) and the batch's ``window`` indices; ``compute`` gathers
    the windows of every rank (a window a ``DistributedSampler`` repeated counts once), finds each question's
    answer with :func:`~lightning_kd.datamodules.squad_postprocess.postprocess` and returns the official
    scores in percent as ``<prefix>/<task>/<name>``: ``exact_match`` and ``f1`` for v1.1; ``exact``, ``f1``,
    ``HasAns_*``, ``NoAns_*`` and the best null threshold's ``best_exact``/``best_f1`` (with ``*_thresh``) for
    v2.0; and ``score``, their mean of exact match and F1, one number to monitor. An evaluation that saw only
    part of the split (a sanity check, ``limit_val_batches``) is scored over the questions it saw.
    """

    target_key = "window"

    def __init__(
        self,
        reference: SquadReference,
        task: str,
        prefix: str = "val",
        n_best: int = 20,
        max_answer_length: int = 30,
        null_score_diff_threshold: float = 0.0,
    ) -> None:
        super().__init__()
        self.reference = reference
        self.task = task
        self.prefix = prefix
        self.n_best = n_best
        self.max_answer_length = max_answer_length
        self.null_score_diff_threshold = null_score_diff_threshold
        self.windows = _Windows()
        self.last_answers: SquadAnswers | None = None

    @torch.no_grad()
    def update(self, logits: Tensor, windows: Tensor, dataloader_idx: int = 0) -> None:
        width = self.reference.offsets.shape[1]
        logits = logits.detach().float()
        if logits.dim() != 3 or logits.shape[1] != 2 or logits.shape[2] > width:
            raise ValueError(
                f"SQuAD scoring takes [batch, 2, tokens <= {width}] start and end logits, got "
                f"{tuple(logits.shape)}: is the model a question-answering one?"
            )
        # padded to the DataModule's max_length, so that every rank's rows stack whatever their batch's padding
        logits = F.pad(logits, (0, width - logits.shape[2]), value=float("-inf"))
        self.windows.update(windows.detach().reshape(-1).long(), logits)

    def answers(self) -> tuple[SquadAnswers, list[str]]:
        """The answers to the questions the evaluated windows belong to, and those questions' ids."""
        windows, logits = self.windows.compute()
        # torchmetrics squeezes a one-element result to a scalar
        windows, first = _first_occurrences(windows.cpu().reshape(-1))
        logits = logits.cpu()[first]
        reference = self.reference
        question = reference.window_question[windows]
        seen, local = torch.unique(question, return_inverse=True)
        ids = [reference.ids[i] for i in seen.tolist()]
        answers = postprocess(
            logits[:, 0],
            logits[:, 1],
            reference.offsets[windows],
            local,
            [reference.contexts[i] for i in seen.tolist()],
            ids,
            n_best=self.n_best,
            max_answer_length=self.max_answer_length,
            version_2=reference.version_2,
            null_score_diff_threshold=self.null_score_diff_threshold,
        )
        self.last_answers = answers
        return answers, ids

    def compute(self) -> dict[str, float]:
        if not self.windows.update_called:
            return {}
        answers, ids = self.answers()
        golds = self.reference.golds
        golds = {qid: golds[qid] for qid in ids}
        if self.reference.version_2:
            # the predictions already apply the threshold; the odds give the best-threshold search
            scores = squad_v2_scores(answers.answers, golds, answers.null_odds, threshold=float("inf"))
            scores = {k: v for k, v in scores.items() if not k.endswith("total")}
            exact = scores["exact"]
        else:
            scores = squad_v1_scores(answers.answers, golds)
            exact = scores["exact_match"]
        scores["score"] = (exact + scores["f1"]) / 2
        return {f"{self.prefix}/{self.task}/{name}": float(value) for name, value in scores.items()}

    def reset(self) -> None:
        self.windows.reset()


def _first_occurrences(windows: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct window indices in ascending order, and where each first occurs in ``windows``."""
    unique, inverse = torch.unique(windows, return_inverse=True)
    positions = torch.arange(len(windows))
    first = torch.full((len(unique),), len(windows)).scatter_reduce(0, inverse, positions, "amin")
    return unique, first
