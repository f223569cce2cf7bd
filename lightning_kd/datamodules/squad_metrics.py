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
