"""SquadMetrics: windows' start and end logits, gathered in any batch order and padding, scored as the official
scripts score the answers they lead to."""

from __future__ import annotations

import pytest
import torch

from lightning_kd.datamodules.squad_metrics import SquadMetrics, squad_v1_scores
from lightning_kd.datamodules.squad_tasks import SquadReference

WIDTH = 8  # the DataModule's max_length


def _offsets(spans: list[tuple[int, int] | None]) -> torch.Tensor:
    rows = [span if span is not None else (-1, -1) for span in spans]
    rows += [(-1, -1)] * (WIDTH - len(rows))
    return torch.tensor(rows, dtype=torch.int32)


def _reference(version_2: bool = False) -> SquadReference:
    # token 0 is CLS, tokens 1-2 the question, then context words; question 0 spans two windows
    contexts = ["red green blue yellow", "one two three", "cats purr"]
    words = {
        0: [(0, 3), (4, 9), (10, 14)],  # window 0: red green blue
        1: [(10, 14), (15, 21)],  # window 1: blue yellow
        2: [(0, 3), (4, 7), (8, 13)],
        3: [(0, 4), (5, 9)],
    }
    offsets = torch.stack([_offsets([None, None, None, *words[w]]) for w in range(4)])
    answers = [["yellow"], ["two", "two three"], [] if version_2 else ["purr"]]
    return SquadReference(
        ids=["q0", "q1", "q2"],
        contexts=contexts,
        answers=answers,
        window_question=torch.tensor([0, 0, 1, 2]),
        offsets=offsets,
        version_2=version_2,
    )


def _logits(width: int, start: int, end: int) -> torch.Tensor:
    logits = torch.zeros(2, width)
    logits[0, start], logits[1, end] = 10.0, 10.0
    return logits


def test_answers_found_over_windows_batches_and_padding_are_scored_officially() -> None:
    metrics = SquadMetrics(_reference(), "squad")
    # batch 1: windows 1 and 0 padded to 6 tokens; batch 2: windows 3, 2 and a repeat of 0 (a sampler's padding)
    metrics.update(torch.stack([_logits(6, 4, 4), _logits(6, 0, 0)]), torch.tensor([1, 0]))
    metrics.update(
        torch.stack([_logits(5, 4, 4), _logits(5, 4, 4), _logits(5, 0, 0)]),
        torch.tensor([3, 2, 0]),
    )
    scores = metrics.compute()
    answers = metrics.last_answers.answers
    assert answers == {"q0": "yellow", "q1": "two", "q2": "purr"}
    expected = squad_v1_scores(answers, _reference().golds)
    assert scores == {
        "val/squad/exact_match": expected["exact_match"],
        "val/squad/f1": expected["f1"],
        "val/squad/score": 100.0,
    }
    metrics.reset()
    metrics.update(torch.stack([_logits(8, 3, 5)]), torch.tensor([2]))  # "one two three"
    # only question 1 was evaluated: it alone is scored (F1 of "one two three" against "two three" is 0.8)
    assert metrics.compute() == {
        "val/squad/exact_match": 0.0,
        "val/squad/f1": pytest.approx(80.0),
        "val/squad/score": pytest.approx(40.0),
    }


def test_v2_scores_the_null_answer_and_reports_the_best_threshold() -> None:
    metrics = SquadMetrics(_reference(version_2=True), "squad_v2", prefix="test")
    cls = torch.zeros(2, WIDTH)
    cls[:, 0] = 10.0  # the null answer wins on question 2's window
    windows = torch.stack([_logits(WIDTH, 0, 0), _logits(WIDTH, 4, 4), _logits(WIDTH, 4, 4), cls])
    metrics.update(windows, torch.arange(4))
    scores = metrics.compute()
    assert metrics.last_answers.answers == {"q0": "yellow", "q1": "two", "q2": ""}
    assert scores["test/squad_v2/exact"] == 100.0
    assert scores["test/squad_v2/HasAns_exact"] == 100.0 and scores["test/squad_v2/NoAns_exact"] == 100.0
    assert {"test/squad_v2/best_f1", "test/squad_v2/best_f1_thresh", "test/squad_v2/score"} <= set(scores)
    assert not any(key.endswith("total") for key in scores)


def test_logits_that_are_not_start_and_end_scores_are_refused() -> None:
    metrics = SquadMetrics(_reference(), "squad")
    with pytest.raises(ValueError, match="question-answering"):
        metrics.update(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="tokens <= 8"):
        metrics.update(torch.zeros(1, 2, 9), torch.tensor([0]))
    assert metrics.compute() == {}
