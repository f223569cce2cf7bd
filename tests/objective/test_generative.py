"""Next-token divergences against values worked out by hand, their identities, and the chunked loss against the
unchunked one (values, gradients, recomputation)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_kd.objective.generative import TOKEN_LOSSES, chunked_token_loss, token_divergence

LN = math.log


def logits(*probs: float) -> torch.Tensor:
    """One row of logits whose softmax is ``probs``."""
    return torch.tensor([[LN(p) for p in probs]], dtype=torch.float64)


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * LN(a / b) for a, b in zip(p, q, strict=True))


TEACHER = [0.75, 0.25]
STUDENT = [0.5, 0.5]


def random_pair(shape: tuple[int, ...] = (6, 11), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(shape, generator=generator, dtype=torch.float64) * 2,
        torch.randn(shape, generator=generator, dtype=torch.float64) * 2,
    )


# --- known values -------------------------------------------------------------------------------------------


def test_forward_kl_known_value() -> None:
    value = token_divergence(logits(*TEACHER), logits(*STUDENT), "forward_kl")
    assert value.shape == (1,)
    assert value.item() == pytest.approx(0.75 * LN(1.5) + 0.25 * LN(0.5))


def test_reverse_kl_known_value() -> None:
    value = token_divergence(logits(*TEACHER), logits(*STUDENT), "reverse_kl")
    assert value.item() == pytest.approx(0.5 * LN(0.5 / 0.75) + 0.5 * LN(0.5 / 0.25))


@pytest.mark.parametrize("beta", [0.2, 0.5, 0.9])
def test_jsd_known_value_beta_is_the_teachers_share(beta: float) -> None:
    mixture = [beta * t + (1 - beta) * s for t, s in zip(TEACHER, STUDENT, strict=True)]
    expected = beta * kl(TEACHER, mixture) + (1 - beta) * kl(STUDENT, mixture)
    value = token_divergence(logits(*TEACHER), logits(*STUDENT), "jsd", beta=beta)
    assert value.item() == pytest.approx(expected)


def test_temperature_softens_both_sides_and_scales_by_its_square() -> None:
    # logits [ln 9, 0] / 2 = [ln 3, 0]: softmax [0.75, 0.25]; [0, 0] stays uniform
    teacher = torch.tensor([[LN(9.0), 0.0]], dtype=torch.float64)
    student = torch.zeros(1, 2, dtype=torch.float64)
    value = token_divergence(teacher, student, "forward_kl", temperature=2.0)
    assert value.item() == pytest.approx(4 * kl(TEACHER, STUDENT))
    value = token_divergence(teacher, student, "topk", temperature=2.0, top_k=2)
    assert value.item() == pytest.approx(4 * kl(TEACHER, STUDENT))


def test_topk_reads_the_teachers_largest_tokens_against_the_full_student_softmax() -> None:
    # the teacher's top 2 are tokens 1 and 2 (0.5, 0.3): q = [0.625, 0.375]; the student gives each 0.2
    value = token_divergence(logits(0.2, 0.5, 0.3), logits(0.6, 0.2, 0.2), "topk", top_k=2)
    assert value.item() == pytest.approx(0.625 * LN(0.625 / 0.2) + 0.375 * LN(0.375 / 0.2))


def test_topk_of_equal_models_is_minus_log_of_the_students_top_k_mass() -> None:
    same = logits(0.2, 0.5, 0.3)
    assert token_divergence(same, same, "topk", top_k=2).item() == pytest.approx(-LN(0.8))
    assert token_divergence(same, same, "topk", top_k=1).item() == pytest.approx(-LN(0.5))


# --- identities ---------------------------------------------------------------------------------------------


def test_forward_kl_is_reverse_kl_with_the_arguments_swapped() -> None:
    teacher, student = random_pair()
    torch.testing.assert_close(
        token_divergence(teacher, student, "forward_kl"), token_divergence(student, teacher, "reverse_kl")
    )
    assert not torch.allclose(
        token_divergence(teacher, student, "forward_kl"), token_divergence(teacher, student, "reverse_kl")
    )


def test_jsd_ends_are_the_two_kls_and_the_formula_tends_to_them() -> None:
    teacher, student = random_pair()
    forward = token_divergence(teacher, student, "forward_kl")
    reverse = token_divergence(teacher, student, "reverse_kl")
    torch.testing.assert_close(token_divergence(teacher, student, "jsd", beta=0.0), forward)
    torch.testing.assert_close(token_divergence(teacher, student, "jsd", beta=1.0), reverse)
    # the mixture formula near the ends: JSD_b ~ b KL(t||s) near 0, (1 - b) KL(s||t) near 1
    small = 1e-5
    torch.testing.assert_close(
        token_divergence(teacher, student, "jsd", beta=small) / small, forward, rtol=1e-3, atol=0
    )
    torch.testing.assert_close(
        token_divergence(teacher, student, "jsd", beta=1 - small) / small, reverse, rtol=1e-3, atol=0
    )


def test_jsd_is_symmetric_at_one_half_and_mirrors_beta_otherwise() -> None:
    teacher, student = random_pair()
    torch.testing.assert_close(
        token_divergence(teacher, student, "jsd", beta=0.5),
        token_divergence(student, teacher, "jsd", beta=0.5),
    )
    torch.testing.assert_close(
        token_divergence(teacher, student, "jsd", beta=0.3),
        token_divergence(student, teacher, "jsd", beta=0.7),
    )
    assert not torch.allclose(
        token_divergence(teacher, student, "jsd", beta=0.3),
        token_divergence(student, teacher, "jsd", beta=0.3),
    )


def test_topk_with_the_whole_vocabulary_is_forward_kl() -> None:
    teacher, student = random_pair()
    torch.testing.assert_close(
        token_divergence(teacher, student, "topk", top_k=teacher.shape[-1], temperature=1.5),
        token_divergence(teacher, student, "forward_kl", temperature=1.5),
    )


@pytest.mark.parametrize("loss", TOKEN_LOSSES)
def test_every_loss_is_zero_when_the_student_is_the_teacher(loss: str) -> None:
    same, _ = random_pair()
    top_k = same.shape[-1] if loss == "topk" else None
    value = token_divergence(same, same.clone(), loss, temperature=2.0, beta=0.3, top_k=top_k)
    torch.testing.assert_close(value, torch.zeros(len(same), dtype=torch.float64))


@pytest.mark.parametrize("loss", TOKEN_LOSSES)
def test_every_loss_is_positive_when_they_differ(loss: str) -> None:
    teacher, student = random_pair()
    assert (token_divergence(teacher, student, loss, top_k=3 if loss == "topk" else None) > 0).all()


def test_leading_dimensions_are_kept() -> None:
    teacher, student = random_pair((2, 3, 5))
    value = token_divergence(teacher, student, "jsd")
    assert value.shape == (2, 3)
    torch.testing.assert_close(value[1], token_divergence(teacher[1], student[1], "jsd"))


def test_half_precision_logits_are_computed_in_float32() -> None:
    teacher, student = (x.to(torch.bfloat16) for x in random_pair((4, 300)))
    for loss in ("forward_kl", "jsd"):
        value = token_divergence(teacher, student, loss)
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, token_divergence(teacher.float(), student.float(), loss))


def test_a_slot_masked_with_minus_infinity_counts_zero() -> None:
    teacher = torch.tensor([[LN(0.75), LN(0.25), -math.inf]], dtype=torch.float64)
    student = torch.tensor([[0.0, 0.0, -math.inf]], dtype=torch.float64)
    for loss, expected in (("forward_kl", kl(TEACHER, STUDENT)), ("reverse_kl", kl(STUDENT, TEACHER))):
        assert token_divergence(teacher, student, loss).item() == pytest.approx(expected)


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": "kl"}, "unknown token loss 'kl': use one of 'forward_kl'"),
        ({"loss": "jsd", "beta": -0.1}, r"beta must be a number in \[0, 1\], got -0.1"),
        ({"loss": "jsd", "beta": 1.5}, r"beta must be a number in \[0, 1\], got 1.5"),
        ({"loss": "jsd", "beta": math.nan}, "beta must be"),
        ({"loss": "forward_kl", "temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"loss": "topk"}, "loss 'topk' needs top_k"),
        ({"loss": "topk", "top_k": 0}, "top_k must be a whole number >= 1, got 0"),
        ({"loss": "topk", "top_k": 2.0}, "top_k must be a whole number"),
        ({"loss": "topk", "top_k": 6}, "top_k must be at most the vocabulary size 5, got 6"),
        ({"loss": "forward_kl", "top_k": 2}, "top_k is read only by loss 'topk'"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    teacher, student = random_pair((2, 5))
    with pytest.raises(ValueError, match=message):
        token_divergence(teacher, student, **kwargs)


def test_logits_of_different_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"same shape .* got teacher \[2, 5\] and student \[3, 5\]"):
        token_divergence(torch.zeros(2, 5), torch.zeros(3, 5), "forward_kl")
    with pytest.raises(ValueError, match="The vocabularies differ.*tokenizer's vocabulary"):
        token_divergence(torch.zeros(2, 5), torch.zeros(2, 6), "forward_kl")


# --- chunked ------------------------------------------------------------------------------------------------

ROWS, TEACHER_WIDTH, STUDENT_WIDTH, VOCABULARY = 10, 6, 4, 13


class CountingHead(nn.Module):
    """A norm and a linear map to the vocabulary, recording the rows of every call and whether it had a graph."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, VOCABULARY)
        self.calls: list[tuple[int, bool]] = []

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls.append((len(hidden), torch.is_grad_enabled()))
        return self.linear(self.norm(hidden))


def setup_heads(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, CountingHead, CountingHead]:
    torch.manual_seed(seed)
    teacher_head = CountingHead(TEACHER_WIDTH).double()
    student_head = CountingHead(STUDENT_WIDTH).double()
    teacher_hidden = torch.randn(ROWS, TEACHER_WIDTH, dtype=torch.float64)
    student_hidden = torch.randn(ROWS, STUDENT_WIDTH, dtype=torch.float64, requires_grad=True)
    return teacher_hidden, student_hidden, teacher_head, student_head


def unchunked(teacher_hidden, student_hidden, teacher_head, student_head, weights=None, **settings):
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)
    values = token_divergence(teacher_logits, student_head(student_hidden), **settings)
    return values.mean() if weights is None else (values * weights).sum() / weights.sum()


def loss_and_gradients(function, weights, **settings):
    teacher_hidden, student_hidden, teacher_head, student_head = setup_heads()
    value = function(teacher_hidden, student_hidden, teacher_head, student_head, weights, **settings)
    value.backward()
    gradients = [student_hidden.grad] + [p.grad for p in student_head.parameters()]
    assert all(p.grad is None for p in teacher_head.parameters())
    return value.detach(), gradients


SETTINGS = [
    {"loss": "forward_kl", "temperature": 2.0},
    {"loss": "reverse_kl"},
    {"loss": "jsd", "beta": 0.3},
    {"loss": "topk", "top_k": 4, "temperature": 1.5},
]
WEIGHTS = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0, 1.0, 0.0, 3.0, 1.0, 0.25], dtype=torch.float64)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: s["loss"])
@pytest.mark.parametrize("weights", [None, WEIGHTS], ids=["mean", "weighted"])
@pytest.mark.parametrize("chunk_size", [1, 3, 10, 64])
def test_chunked_equals_unchunked_in_value_and_gradients(settings, weights, chunk_size) -> None:
    expected, expected_gradients = loss_and_gradients(unchunked, weights, **settings)
    value, gradients = loss_and_gradients(chunked_token_loss, weights, chunk_size=chunk_size, **settings)
    torch.testing.assert_close(value, expected)
    assert expected > 0
    for gradient, reference in zip(gradients, expected_gradients, strict=True):
        assert reference.abs().sum() > 0
        torch.testing.assert_close(gradient, reference)


def test_chunks_are_bounded_the_teacher_has_no_graph_and_backward_recomputes() -> None:
    teacher_hidden, student_hidden, teacher_head, student_head = setup_heads()
    value = chunked_token_loss(teacher_hidden, student_hidden, teacher_head, student_head, chunk_size=4)
    assert [rows for rows, _ in student_head.calls] == [4, 4, 2]
    assert [grad for _, grad in teacher_head.calls] == [False] * 3
    value.backward()
    # each chunk's logits are recomputed in backward (checkpointing), the teacher's without a graph too
    assert sorted(rows for rows, _ in student_head.calls) == [2, 2, 4, 4, 4, 4]
    assert len(teacher_head.calls) == 6 and not any(grad for _, grad in teacher_head.calls)


def test_a_mask_as_weights_averages_the_kept_rows() -> None:
    teacher_hidden, student_hidden, teacher_head, student_head = setup_heads()
    keep = torch.tensor([True, False] * (ROWS // 2))
    value = chunked_token_loss(teacher_hidden, student_hidden, teacher_head, student_head, keep, chunk_size=3)
    kept = unchunked(
        teacher_hidden[keep], student_hidden[keep], teacher_head, student_head, loss="forward_kl"
    )
    torch.testing.assert_close(value, kept)


def test_no_rows_or_no_weight_give_a_zero_that_backward_passes_through() -> None:
    teacher_hidden, student_hidden, teacher_head, student_head = setup_heads()
    zero = chunked_token_loss(teacher_hidden, student_hidden, teacher_head, student_head, torch.zeros(ROWS))
    zero.backward()
    assert zero.item() == 0 and student_hidden.grad.abs().sum() == 0
    empty = student_hidden[:0].detach().requires_grad_()
    zero = chunked_token_loss(teacher_hidden[:0], empty, teacher_head, student_head)
    zero.backward()
    assert zero.item() == 0 and student_head.linear.weight.grad.abs().sum() == 0


def test_without_autograd_the_value_is_the_same_and_nothing_is_recomputed() -> None:
    teacher_hidden, student_hidden, teacher_head, student_head = setup_heads()
    with torch.no_grad():
        value = chunked_token_loss(teacher_hidden, student_hidden, teacher_head, student_head, chunk_size=3)
    torch.testing.assert_close(
        value, unchunked(teacher_hidden, student_hidden, teacher_head, student_head, loss="forward_kl")
    )
    assert len(student_head.calls) == 4 + 1  # the reference's one call


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"student_hidden": torch.zeros(9, STUDENT_WIDTH)}, r"same N .* got \[10, 6\] and \[9, 4\]"),
        ({"teacher_hidden": torch.zeros(2, 5, TEACHER_WIDTH)}, r"must be \[N, hidden\]"),
        ({"weights": torch.ones(2, 5)}, r"weights must be one value per row, shape \[10\], got \[2, 5\]"),
        ({"chunk_size": 0}, "chunk_size must be a whole number >= 1, got 0"),
        ({"loss": "kl"}, "unknown token loss 'kl'"),
        ({"loss": "topk", "top_k": VOCABULARY + 1}, "top_k must be at most the vocabulary size 13"),
    ],
)
def test_chunked_bad_input_is_refused(change: dict, message: str) -> None:
    teacher_hidden, student_hidden, teacher_head, student_head = setup_heads()
    arguments = {
        "teacher_hidden": teacher_hidden,
        "student_hidden": student_hidden,
        "teacher_head": teacher_head,
    }
    arguments.update(student_head=student_head, **change)
    with pytest.raises(ValueError, match=message):
        chunked_token_loss(**arguments)
