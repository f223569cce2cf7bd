"""A QA head's start and end logits as the objective reads them: two distributions over the window's tokens,
their padding scored out, and the cross-entropy Hugging Face's QA models compute."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_model
from torch.nn import functional as F

from lightning_kd.objective.predictions import prediction_kl, prediction_mse, span_cross_entropy


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    p = p_logits.softmax(-1)
    return (p * (p.log() - q_logits.log_softmax(-1))).sum()


def test_the_span_kl_is_the_mean_of_the_start_and_end_kls_over_real_tokens() -> None:
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 2, 6), torch.randn(2, 2, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    # the second window's padding holds huge scores: they must not count
    teacher[1, :, 4:], student[1, :, 4:] = 50.0, -50.0
    expected = torch.stack(
        [
            _kl(teacher[b, k, : int(mask[b].sum())], student[b, k, : int(mask[b].sum())])
            for b in range(2)
            for k in range(2)
        ]
    ).mean()
    batch = {"attention_mask": mask}
    got = prediction_kl(teacher, student, batch, temperature=1.0, spans=True)
    torch.testing.assert_close(got, expected)
    # softened by T and scaled by T², as for classification
    t = 3.0
    soft = torch.stack(
        [
            _kl(teacher[b, k, : int(mask[b].sum())] / t, student[b, k, : int(mask[b].sum())] / t)
            for b in range(2)
            for k in range(2)
        ]
    ).mean()
    torch.testing.assert_close(prediction_kl(teacher, student, batch, temperature=t, spans=True), soft * t**2)
    assert prediction_kl(teacher, teacher.clone(), batch, 1.0, spans=True).abs() < 1e-6


def test_the_span_mse_ignores_padding() -> None:
    teacher, student = torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)
    student[0, :, 3] = 100.0  # only on padding
    mask = torch.tensor([[1, 1, 1, 0]])
    assert prediction_mse(teacher, student, {"attention_mask": mask}, spans=True) == 0
    student[0, 0, 0] = 2.0
    # one real difference of 2 over 2 rows of 4 tokens
    assert prediction_mse(teacher, student, {"attention_mask": mask}, spans=True) == pytest.approx(4 / 8)


def test_the_span_cross_entropy_is_the_qa_models_own_loss(arch: str) -> None:
    model = make_model(arch, "qa")
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, model.config.vocab_size, (3, 9), generator=generator)
    starts, ends = torch.tensor([0, 2, 5]), torch.tensor([0, 4, 8])
    with torch.no_grad():
        out = model(input_ids=ids, start_positions=starts, end_positions=ends)
    logits = torch.stack([out.start_logits, out.end_logits], dim=1)
    batch = {"start_positions": starts, "end_positions": ends}
    torch.testing.assert_close(span_cross_entropy(logits, batch), out.loss)
    expected = (F.cross_entropy(out.start_logits, starts) + F.cross_entropy(out.end_logits, ends)) / 2
    torch.testing.assert_close(span_cross_entropy(logits, batch), expected)


def test_a_batch_without_positions_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="start_positions.*SQuADDataModule"):
        span_cross_entropy(torch.zeros(1, 2, 4), {"labels": torch.zeros(1)})
