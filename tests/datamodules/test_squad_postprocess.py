"""The vectorised SQuAD post-processing against the per-window loop of the Hugging Face examples, and by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_kd.datamodules.squad_postprocess import postprocess, postprocess_reference

QUESTION_TOKENS = 4  # [CLS] q q q q [SEP] context... [SEP] padding


def synthetic_windows(
    questions: int, max_windows: int, tokens: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str], list[str]]:
    """Random logits over windows laid out as a tokenizer lays them out, one word a token; a question's
    windows overlap by half, and its last window is padded."""
    generator = torch.Generator().manual_seed(seed)
    capacity = tokens - QUESTION_TOKENS - 3
    stride = capacity // 2
    offsets, window_question, contexts = [], [], []
    for index in range(questions):
        count = int(torch.randint(1, max_windows + 1, (1,), generator=generator))
        words = (count - 1) * stride + int(torch.randint(1, capacity + 1, (1,), generator=generator))
        texts = [f"w{index}_{j}" for j in range(words)]
        starts = [sum(len(t) + 1 for t in texts[:j]) for j in range(words)]
        contexts.append(" ".join(texts))
        for window in range(count):
            row = torch.full((tokens, 2), -1, dtype=torch.long)
            first = window * stride
            for position, word in enumerate(range(first, min(first + capacity, words))):
                row[QUESTION_TOKENS + 2 + position] = torch.tensor(
                    [starts[word], starts[word] + len(texts[word])]
                )
            offsets.append(row)
            window_question.append(index)
    windows = len(offsets)
    start = torch.randn(windows, tokens, generator=generator)
    end = torch.randn(windows, tokens, generator=generator)
    # a spread of null scores, so that v2.0 answers some questions and not others
    start[:, 0] += 2 * torch.randn(windows, generator=generator) + 2
    ids = [f"q{index}" for index in range(questions)]
    return start, end, torch.stack(offsets), torch.tensor(window_question), contexts, ids


@pytest.mark.parametrize("version_2", [False, True])
@pytest.mark.parametrize("max_answer_length", [3, 30])
@pytest.mark.parametrize("n_best", [1, 5, 20])
def test_same_answers_and_odds_as_the_reference_on_random_logits(
    n_best: int, max_answer_length: int, version_2: bool
) -> None:
    inputs = synthetic_windows(questions=40, max_windows=3, tokens=48, seed=n_best + max_answer_length)
    settings = dict(n_best=n_best, max_answer_length=max_answer_length, version_2=version_2)
    expected = postprocess_reference(*inputs, **settings)
    got = postprocess(*inputs, **settings)
    assert got.answers == expected.answers
    assert got.null_odds == expected.null_odds
    assert len(got.answers) == 40
    if version_2:
        assert len(got.null_odds) == 40
        texts = list(got.answers.values())
        assert "" in texts and any(texts), "the grid should produce both null and span answers"
    else:
        assert got.null_odds == {}
    if n_best > 1:
        # answers that only a later window holds (words past the first window's 41) are part of the comparison
        assert any(text and int(text.split()[0].split("_")[1]) >= 41 for text in got.answers.values())


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 2.5])
def test_null_threshold_matches_the_reference(threshold: float) -> None:
    inputs = synthetic_windows(questions=30, max_windows=2, tokens=40, seed=7)
    settings = dict(version_2=True, null_score_diff_threshold=threshold)
    assert postprocess(*inputs, **settings) == postprocess_reference(*inputs, **settings)


# Hand-built windows of 10 tokens: [CLS] q [SEP] c c c c [SEP] pad pad; context tokens at 3..6.
CONTEXT = "alpha beta gamma delta epsilon zeta"
SPANS = {
    "alpha": (0, 5),
    "beta": (6, 10),
    "gamma": (11, 16),
    "delta": (17, 22),
    "epsilon": (23, 30),
    "zeta": (31, 35),
}


def window(words: list[str]) -> torch.Tensor:
    row = torch.full((10, 2), -1, dtype=torch.long)
    for position, word in enumerate(words):
        row[3 + position] = torch.tensor(SPANS[word])
    return row


def both(*args: object, **kwargs: object):
    got, expected = postprocess(*args, **kwargs), postprocess_reference(*args, **kwargs)
    assert got == expected
    return got


def test_answer_in_the_second_window_and_min_null_over_windows() -> None:
    offsets = torch.stack(
        [window(["alpha", "beta", "gamma", "delta"]), window(["gamma", "delta", "epsilon", "zeta"])]
    )
    start, end = torch.zeros(2, 10), torch.zeros(2, 10)
    start[0, 4], end[0, 5] = 2.0, 2.0  # "beta gamma" in window 0: 4.0
    start[1, 4], end[1, 5] = 3.0, 2.5  # "delta epsilon" in window 1: 5.5
    start[:, 0] = torch.tensor([1.0, 4.0])
    end[:, 0] = torch.tensor([1.5, 0.0])  # null 2.5 in window 0, 4.0 in window 1: the smaller counts
    out = both(start, end, offsets, [0, 0], [CONTEXT], ["q"], version_2=True)
    assert out.answers == {"q": "delta epsilon"}
    assert out.null_odds == {"q": 2.5 - 5.5}
    # beating the best span by more than the threshold makes the answer empty
    out = both(start, end, offsets, [0, 0], [CONTEXT], ["q"], version_2=True, null_score_diff_threshold=-3.5)
    assert out.answers == {"q": ""}


def test_spans_leaving_the_context_are_rejected() -> None:
    offsets = window(["alpha", "beta", "gamma", "delta"])[None]
    start, end = torch.full((1, 10), -10.0), torch.full((1, 10), -10.0)
    start[0, 1], end[0, 3] = 9.0, 9.0  # from the question into the context
    start[0, 6], end[0, 7] = 8.0, 8.0  # from the context onto the closing [SEP]
    start[0, 0], end[0, 0] = 7.0, 7.0  # the [CLS] token, the null answer, is no span
    start[0, 5], end[0, 5] = 1.0, 1.0  # the best valid span: "gamma"
    out = both(start, end, offsets, [0], [CONTEXT], ["q"])
    assert out.answers == {"q": "gamma"}


def test_context_mask_overrides_the_offsets() -> None:
    offsets = window(["alpha", "beta", "gamma", "delta"])[None]
    start, end = torch.zeros(1, 10), torch.zeros(1, 10)
    start[0, 3], end[0, 3] = 5.0, 5.0  # "alpha", masked out below
    start[0, 4], end[0, 4] = 1.0, 1.0
    mask = offsets[..., 0] >= 0
    mask[0, 3] = False
    assert both(start, end, offsets, [0], [CONTEXT], ["q"], context_mask=mask).answers == {"q": "beta"}


def test_too_long_spans_are_rejected() -> None:
    offsets = window(["alpha", "beta", "gamma", "delta"])[None]
    start, end = torch.full((1, 10), -10.0), torch.full((1, 10), -10.0)
    start[0, 3], end[0, 6] = 9.0, 9.0  # "alpha ... delta": 4 tokens, 18.0
    start[0, 4], end[0, 5] = 1.0, 1.5  # crossing: alpha-gamma 10.5, beta-delta 10.0, beta-gamma 2.5
    answer = {
        n: both(start, end, offsets, [0], [CONTEXT], ["q"], max_answer_length=n).answers["q"]
        for n in (4, 3, 2)
    }
    assert answer == {4: "alpha beta gamma delta", 3: "alpha beta gamma", 2: "beta gamma"}


def test_reversed_spans_are_rejected() -> None:
    offsets = window(["alpha", "beta", "gamma", "delta"])[None]
    start, end = torch.full((1, 10), -10.0), torch.full((1, 10), -10.0)
    start[0, 6], end[0, 3] = 9.0, 9.0  # "delta" back to "alpha"
    start[0, 4], end[0, 5] = 1.0, 1.0
    assert both(start, end, offsets, [0], [CONTEXT], ["q"]).answers == {"q": "beta gamma"}


def test_no_valid_span_answers_empty_with_infinite_odds() -> None:
    offsets = window(["alpha"])[None]
    start, end = torch.zeros(1, 10), torch.zeros(1, 10)
    start[0, 3], end[0, 1] = 5.0, 5.0
    # n_best 1: the only start candidate is "alpha", the only end one the question token
    out = both(start, end, offsets, [0], [CONTEXT], ["q"], n_best=1, version_2=True)
    assert out.answers == {"q": ""}
    assert math.isinf(out.null_odds["q"]) and out.null_odds["q"] > 0
    assert both(start, end, offsets, [0], [CONTEXT], ["q"], n_best=1).answers == {"q": ""}


def test_questions_in_any_window_order() -> None:
    start, end, offsets, question, contexts, ids = synthetic_windows(
        questions=12, max_windows=3, tokens=32, seed=3
    )
    order = torch.randperm(len(question), generator=torch.Generator().manual_seed(0))
    shuffled = postprocess(
        start[order], end[order], offsets[order], question[order], contexts, ids, version_2=True
    )
    assert shuffled == postprocess(start, end, offsets, question, contexts, ids, version_2=True)


def test_bad_inputs_are_named() -> None:
    start, end, offsets, question, contexts, ids = synthetic_windows(
        questions=3, max_windows=1, tokens=16, seed=0
    )
    with pytest.raises(ValueError, match="no window"):
        postprocess(start, end, offsets, question, [*contexts, "x"], [*ids, "extra"])
    with pytest.raises(ValueError, match="offsets"):
        postprocess(start, end, offsets[:, :-1], question, contexts, ids)
    with pytest.raises(ValueError, match="window_question"):
        postprocess(start, end, offsets, question + 5, contexts, ids)
