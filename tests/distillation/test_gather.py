"""Predicting only where a loss reads: for every model family and every term that reads predictions, the
gathered path (prediction head applied at the collate function's positions) equals the all-position path on
the positions it reads, in value and in gradient, padding included."""

from __future__ import annotations

from functools import partial

import pytest
import tiny_models
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    DebertaV2Config,
    DebertaV2ForMaskedLM,
    RobertaConfig,
    RobertaForMaskedLM,
)

from lightning_kd import DistillationModule
from lightning_kd.datamodules import with_prediction_positions
from lightning_kd.distillation.discrepancy import linear_cka, measure_discrepancy
from lightning_kd.models import get_adapter
from lightning_kd.objective import PREDICTION_POSITIONS, Features, prediction_kl, prediction_mse

# the surgery tests' tiny models, one layer deeper
TINY = {**tiny_models.TINY, "num_hidden_layers": 4}
FAMILIES = {
    "bert": (BertConfig, BertForMaskedLM, {}),
    "roberta": (RobertaConfig, RobertaForMaskedLM, {"pad_token_id": 1}),
    # v3's settings (relative positions, the current head that decodes with the tied word embeddings)
    "deberta-v2": (
        DebertaV2Config,
        DebertaV2ForMaskedLM,
        {
            "relative_attention": True,
            "position_buckets": 8,
            "max_relative_positions": 16,
            "pos_att_type": ["p2c", "c2p"],
            "share_att_key": True,
            "norm_rel_ebd": "layer_norm",
            "position_biased_input": False,
            "type_vocab_size": 0,
            "legacy": False,
        },
    ),
    # the legacy head (BERT-style cls.predictions) that older DeBERTa checkpoints carry
    "deberta-v2-legacy": (DebertaV2Config, DebertaV2ForMaskedLM, {"legacy": True}),
}
OBJECTIVE = [
    {"term": "logits", "temperature": 2.0},
    {"term": "task"},
    {"term": "hidden", "loss": "mse", "layers": "uniform"},
]


def masked_lm(family: str, seed: int = 0) -> torch.nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**TINY, **extra})).eval()


def mlm_batch(vocab: int, batch: int = 4, seq: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Padding at the end of every other row; some labels on padding would be a data bug, so none are."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, seq), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::2, -4:] = 0
    labels = torch.full_like(input_ids, -100)
    chosen = (torch.rand(batch, seq, generator=generator) < 0.3) & attention_mask.bool()
    chosen[:, 2] = True
    labels[chosen] = input_ids[chosen]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def all_positions(module: DistillationModule, model: torch.nn.Module, batch: dict) -> Features:
    """The reference: the model's own forward, vocabulary logits at every position."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    out = model(**inputs, output_hidden_states=True, return_dict=True)
    return Features(logits=out.logits, hidden_states=out.hidden_states)


def distillation_module(family: str) -> DistillationModule:
    module = DistillationModule(
        masked_lm(family), {"init": "layers", "num_layers": 2}, objective=OBJECTIVE, task="masked-lm"
    )
    with torch.no_grad():  # a student that differs from the teacher, so that every term is far from zero
        for parameter in module.student.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return module


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_term_and_its_gradient_equal_the_all_position_path(family: str) -> None:
    module = distillation_module(family)
    batch = with_prediction_positions(mlm_batch(module.teacher.config.vocab_size))
    positions = batch[PREDICTION_POSITIONS]
    assert torch.equal(positions, (batch["labels"].reshape(-1) != -100).nonzero().flatten())

    teacher, student = module.teacher_features(batch), module.student_features(batch)
    assert teacher.logits.shape == student.logits.shape == (len(positions), module.teacher.config.vocab_size)
    loss, terms = module.losses(teacher, student, batch)
    loss.backward()
    gathered_grads = {n: p.grad.clone() for n, p in module.student.named_parameters() if p.grad is not None}
    module.student.zero_grad(set_to_none=True)

    with torch.no_grad():
        ref_teacher = all_positions(module, module.teacher, batch)
    ref_student = all_positions(module, module.student, batch)
    # the head applied at the positions gives exactly the rows of the all-position logits there
    vocab = ref_teacher.logits.shape[-1]
    torch.testing.assert_close(teacher.logits, ref_teacher.logits.reshape(-1, vocab)[positions])
    torch.testing.assert_close(student.logits, ref_student.logits.reshape(-1, vocab)[positions])
    plain = {k: v for k, v in batch.items() if k != PREDICTION_POSITIONS}
    ref_loss, ref_terms = module.objective(ref_teacher, ref_student, plain)
    ref_loss.backward()
    assert set(terms) == {"logits_kl", "task", "hidden_mse"}
    for name in terms:
        torch.testing.assert_close(terms[name], ref_terms[name], rtol=1e-5, atol=1e-6)
    assert terms["logits_kl"] > 1e-3 and terms["task"] > 1e-3  # not trivially equal
    for name, parameter in module.student.named_parameters():
        if name in gathered_grads:
            torch.testing.assert_close(gathered_grads[name], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)

    ours = measure_discrepancy(teacher, student, batch)
    reference = measure_discrepancy(ref_teacher, ref_student, plain)
    assert set(ours) == set(reference)
    for key in ours:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_splits_every_masked_lm_where_its_head_starts(family: str) -> None:
    model = masked_lm(family)
    parts = get_adapter(model).masked_lm_parts(model)
    batch = mlm_batch(model.config.vocab_size)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        hidden = parts.encoder(**inputs).last_hidden_state
        torch.testing.assert_close(parts.predict(hidden), model(**inputs).logits)
    # only masked LMs are split: a bare encoder has no head to move
    assert get_adapter(model.base_model).masked_lm_parts(model.base_model) is None


def test_positions_computed_by_the_module_when_the_batch_lacks_them() -> None:
    module = distillation_module("bert")
    batch = mlm_batch(module.teacher.config.vocab_size)
    prepared = module.prepare_batch(batch)
    assert torch.equal(
        prepared[PREDICTION_POSITIONS], with_prediction_positions(dict(batch))[PREDICTION_POSITIONS]
    )
    # a batch without token labels is predicted everywhere and read on its real (non-padding) tokens
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    assert PREDICTION_POSITIONS not in module.prepare_batch(unlabelled)
    module.objective.terms.pop("task")
    t, s = module.teacher_features(unlabelled), module.student_features(unlabelled)
    assert t.positions is None and t.logits.shape[:2] == batch["input_ids"].shape
    real = batch["attention_mask"].reshape(-1).bool()
    vocab = t.logits.shape[-1]
    expected = prediction_kl(
        t.logits.reshape(-1, vocab)[real],
        s.logits.reshape(-1, vocab)[real],
        {},
        2.0,
        positions=real.nonzero().flatten(),
    )
    torch.testing.assert_close(prediction_kl(t.logits, s.logits, unlabelled, 2.0), expected)


@pytest.mark.parametrize("seed", range(3))
def test_score_mse_and_kl_over_gathered_rows_equal_the_masked_all_position_loss(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    batch = mlm_batch(50, seed=seed)
    positions = with_prediction_positions(dict(batch))[PREDICTION_POSITIONS]
    for width, loss in (
        (1, prediction_mse),
        (50, prediction_mse),
        (50, partial(prediction_kl, temperature=3.0)),
    ):
        t = torch.randn(4, 12, width, generator=generator)
        s = torch.randn(4, 12, width, generator=generator)
        everywhere = loss(t, s, batch)
        gathered = loss(
            t.reshape(-1, width)[positions], s.reshape(-1, width)[positions], batch, positions=positions
        )
        torch.testing.assert_close(gathered, everywhere)


def test_weighted_cka_equals_cka_of_the_kept_rows() -> None:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 8, generator=generator), torch.randn(40, 5, generator=generator)
    y[:, :3] += x[:, :3]
    keep = torch.rand(40, generator=generator) < 0.6
    torch.testing.assert_close(linear_cka(x, y, keep.long()), linear_cka(x[keep], y[keep]))


def test_compile_can_take_the_teacher_alone_and_compiles_the_parts_that_run() -> None:
    module = DistillationModule(
        masked_lm("bert"),
        {"init": "layers", "num_layers": 2},
        task="masked-lm",
        compile={"models": ["teacher"], "backend": "eager"},
    )
    module.on_fit_start()
    assert (
        module.teacher.bert._compiled_call_impl is not None
        and module.teacher.cls._compiled_call_impl is not None
    )
    assert module.student.bert._compiled_call_impl is None
    with pytest.raises(ValueError, match="'techer'.*'student' and/or 'teacher'"):
        DistillationModule(
            masked_lm("bert"),
            {"init": "layers", "num_layers": 2},
            task="masked-lm",
            compile={"models": ["techer"]},
        )
