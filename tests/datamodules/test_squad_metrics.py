"""SQuAD's exact match and F1, v1.1 and v2.0, against values worked out by hand."""

from __future__ import annotations

import pytest

from lightning_kd.datamodules.squad_metrics import (
    exact_match,
    f1_score,
    normalize_answer,
    squad_v1_scores,
    squad_v2_scores,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Quick, brown fox!", "quick brown fox"),
        ("an apple a day", "apple day"),
        ("Theatre and anthem", "theatre and anthem"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("  the  ", ""),
        ("A-ha", "aha"),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_exact_match_ignores_case_punctuation_and_articles() -> None:
    assert exact_match("The Denver Broncos.", "denver broncos") == 1
    assert exact_match("Denver", "Denver Broncos") == 0


def test_f1_over_token_bags() -> None:
    # pred {cat, sat}, gold {cat, sat, on, mat}: precision 1, recall 1/2
    assert f1_score("the cat sat", "a cat sat on the mat") == pytest.approx(2 / 3)
    # a repeated token counts once per occurrence in both: common 1, precision 1/2, recall 1
    assert f1_score("cat cat", "cat") == pytest.approx(2 / 3)
    assert f1_score("dog", "cat") == 0.0
    assert f1_score("Cat, sat.", "the cat sat") == 1.0


def test_f1_of_empty_answers_v2_against_v1() -> None:
    assert f1_score("the", "a") == 1.0  # both normalise to nothing: v2 agrees
    assert f1_score("the", "a", empty_agree=False) == 0.0  # v1.1 never scores an answer without tokens
    assert f1_score("", "cat") == 0.0
    assert f1_score("cat", "") == 0.0


def test_v1_max_over_golds_and_missing_predictions_count_zero() -> None:
    golds = {
        "q1": ["Broncos", "Denver Broncos!"],
        "q2": ["a cat sat on the mat", "dog"],
        "q3": ["x"],
    }
    scores = squad_v1_scores({"q1": "denver broncos", "q2": "the cat sat", "extra": "y"}, golds)
    assert set(scores) == {"exact_match", "f1"}
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)


# Four questions worked out by hand: a and b answerable, c and d not.
V2_GOLDS = {"a": ["Paris"], "b": ["big red dog", "the big red dog"], "c": [], "d": []}
V2_PREDICTIONS = {"a": "Paris", "b": "red dog", "c": "", "d": "London"}
V2_ODDS = {"a": -2.0, "b": 0.5, "d": 0.7, "c": 3.0}


def test_v2_scores_without_null_odds() -> None:
    scores = squad_v2_scores(V2_PREDICTIONS, V2_GOLDS)
    # exact: a 1, b 0, c 1 (empty prediction on an unanswerable question), d 0; f1: b = 2*1*(2/3)/(5/3) = 0.8
    assert scores == pytest.approx(
        {
            "exact": 50.0,
            "f1": 70.0,
            "total": 4,
            "HasAns_exact": 50.0,
            "HasAns_f1": 90.0,
            "HasAns_total": 2,
            "NoAns_exact": 50.0,
            "NoAns_f1": 50.0,
            "NoAns_total": 2,
        }
    )
    assert list(scores)[:3] == ["exact", "f1", "total"]


def test_v2_best_thresholds_worked_by_hand() -> None:
    scores = squad_v2_scores(V2_PREDICTIONS, V2_GOLDS, null_odds=V2_ODDS)
    # Start: all four answered "no answer" -> c, d right = 2. In ascending odds a (-2), b (0.5), d (0.7), c (3):
    # exact: a +1 -> 3 (best, at -2), b +0 -> 3, d -1 -> 2, c 0 -> 2
    # f1:    a +1 -> 3 (best, at -2), b +0.8 -> 3.8 (best, at 0.5), d -1 -> 2.8, c 0 -> 2.8
    assert scores["best_exact"] == pytest.approx(75.0)
    assert scores["best_exact_thresh"] == -2.0
    assert scores["best_f1"] == pytest.approx(95.0)
    assert scores["best_f1_thresh"] == 0.5
    # odds above the threshold (c 3.0 > 1.0) turn into "no answer": c was already empty, nothing changes
    assert scores["exact"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(70.0)


def test_v2_threshold_turns_high_odds_into_no_answer() -> None:
    # at 0.6, d (0.7) and c (3.0) become "no answer", both right; the f1 then is best_f1 at 0.5
    scores = squad_v2_scores(V2_PREDICTIONS, V2_GOLDS, null_odds=V2_ODDS, threshold=0.6)
    assert scores["exact"] == pytest.approx(75.0)
    assert scores["f1"] == pytest.approx(95.0)
    assert scores["NoAns_exact"] == pytest.approx(100.0)
    assert scores["HasAns_f1"] == pytest.approx(90.0)


def test_v2_gold_normalising_to_nothing_is_matched_by_the_empty_answer() -> None:
    # an answer "the" is still an answerable question (HasAns), but its gold becomes ""
    scores = squad_v2_scores({"q": ""}, {"q": ["the"]})
    assert scores["exact"] == 100.0
    assert scores["HasAns_total"] == 1
    assert "NoAns_total" not in scores


def test_v2_only_answerable_questions_has_no_noans_keys() -> None:
    scores = squad_v2_scores({"q": "x"}, {"q": ["x"]})
    assert scores == {
        "exact": 100.0,
        "f1": 100.0,
        "total": 1,
        "HasAns_exact": 100.0,
        "HasAns_f1": 100.0,
        "HasAns_total": 1,
    }


def test_v2_requires_every_prediction_and_odds() -> None:
    with pytest.raises(ValueError, match="no prediction"):
        squad_v2_scores({"a": "Paris"}, V2_GOLDS)
    with pytest.raises(ValueError, match="no null odds"):
        squad_v2_scores(V2_PREDICTIONS, V2_GOLDS, null_odds={"a": 0.0})
