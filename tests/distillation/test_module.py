"""DistillationModule: the frozen teacher, checkpoints without it, exact resume, and clear refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from kd_helpers import (
    VOCAB,
    FixedBatches,
    ResumableBatches,
    StopAt,
    make_batch,
    quiet_trainer,
    tiny_bert_config,
)
from transformers import AutoModel, BertForMaskedLM, BertModel, GPT2Config, GPT2Model

from lightning_kd import DistillationModule

ALL_TERMS = [
    {"term": "logits", "temperature": 2.0},
    {"term": "hidden", "layers": "uniform"},
    {"term": "attention", "layers": "last_layer"},
    {"term": "relations"},
    {"term": "embeddings"},
    {"term": "task", "weight": 0.5},
]


def test_teacher_is_frozen_outside_optimizer_and_unchanged_by_training(teacher: BertForMaskedLM) -> None:
    before = copy.deepcopy(teacher.state_dict())
    module = DistillationModule(
        teacher, {"init": "layers", "num_layers": 2}, objective=ALL_TERMS, learning_rate=1e-2
    )
    trainer = quiet_trainer(max_steps=3)
    trainer.fit(module, FixedBatches())
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert not any(k.startswith("teacher") for k in module.state_dict())
    # the student did learn, and every term was logged
    assert {f"train/{name}" for name in module.terms} <= set(trainer.callback_metrics)
    assert "discrepancy/kl" in trainer.callback_metrics and "discrepancy/hidden" in trainer.callback_metrics


def test_student_learns_and_discrepancy_falls(teacher: BertForMaskedLM) -> None:
    torch.manual_seed(0)
    student = BertForMaskedLM(
        tiny_bert_config(num_hidden_layers=2, hidden_size=8, num_attention_heads=2, intermediate_size=16)
    )
    module = DistillationModule(
        teacher, student, objective=[{"term": "logits"}, {"term": "hidden"}], learning_rate=3e-3
    )
    data = FixedBatches(num_batches=2)
    start = module.discrepancy(data.batches)
    quiet_trainer(max_steps=60).fit(module, data)
    end = module.discrepancy(data.batches)
    assert end["discrepancy/kl"] < 0.5 * start["discrepancy/kl"]
    assert end["discrepancy/hidden"] < start["discrepancy/hidden"]


def test_checkpoint_has_no_teacher_and_resume_equals_uninterrupted(
    teacher: BertForMaskedLM, tmp_path
) -> None:
    def run(
        stop_at: int | None = None, ckpt_path: str | None = None, save: bool = False
    ) -> DistillationModule:
        torch.manual_seed(1)
        module = DistillationModule(
            teacher,
            {"init": "layers", "num_layers": 2},
            objective=ALL_TERMS,
            learning_rate=1e-3,
            warmup_steps=2,
        )
        callbacks = [StopAt(stop_at)] if stop_at else []
        trainer = quiet_trainer(max_steps=6, default_root_dir=tmp_path, callbacks=callbacks)
        # four batches an epoch, stopped in the middle of the first: the loader resumes at the fourth batch
        trainer.fit(module, ResumableBatches(num_batches=4), ckpt_path=ckpt_path)
        if save:
            trainer.save_checkpoint(tmp_path / "mid.ckpt")
        return module

    straight = run()
    run(stop_at=3, save=True)
    checkpoint = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    assert not any(k.startswith("teacher") for k in checkpoint["state_dict"])
    assert checkpoint["lightning_kd"]["teacher_class"] == "BertForMaskedLM"
    resumed = run(ckpt_path=str(tmp_path / "mid.ckpt"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_checkpoint_rebuilds_named_teacher(tmp_path) -> None:
    torch.manual_seed(0)
    BertForMaskedLM(tiny_bert_config()).save_pretrained(tmp_path / "teacher")
    module = DistillationModule(
        str(tmp_path / "teacher"), {"init": "layers", "num_layers": 2}, task="masked-lm"
    )
    trainer = quiet_trainer(max_steps=2, default_root_dir=tmp_path)
    trainer.fit(module, FixedBatches())
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    restored = DistillationModule.load_from_checkpoint(tmp_path / "run.ckpt")
    assert isinstance(restored.teacher, BertForMaskedLM) and not restored.teacher.training
    for a, b in zip(module.student.parameters(), restored.student.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(module.teacher.parameters(), restored.teacher.parameters(), strict=True):
        assert torch.equal(a, b)


def test_students_from_specs(teacher: BertForMaskedLM) -> None:
    batch = make_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    copy_student = DistillationModule(teacher, {"init": "copy"}).student
    assert torch.allclose(copy_student(**inputs).logits, teacher(**inputs).logits)
    assert copy_student.training and all(p.requires_grad for p in copy_student.parameters())
    layered = DistillationModule(teacher, {"init": "layers", "layers": [0, 3]}).student
    assert layered.config.num_hidden_layers == 2
    assert torch.equal(
        layered.bert.encoder.layer[1].output.dense.weight, teacher.bert.encoder.layer[3].output.dense.weight
    )
    fresh = DistillationModule(
        teacher,
        {"init": "config", "config": {"num_hidden_layers": 1, "hidden_size": 8, "num_attention_heads": 2}},
    ).student
    assert (fresh.config.num_hidden_layers, fresh.config.hidden_size) == (1, 8)
    with pytest.raises(ValueError, match="unknown student init .clone.: use one of config, copy"):
        DistillationModule(teacher, {"init": "clone"})
    with pytest.raises(ValueError, match="do not exist"):
        DistillationModule(teacher, {"init": "config", "config": {"num_layers": 2}})


def test_bare_encoder_student_keeps_the_teachers_pooler_frozen() -> None:
    teacher = BertModel(tiny_bert_config())
    module = DistillationModule(teacher, {"init": "layers", "num_layers": 2})
    # frozen: no term reads it and DDP refuses parameters without gradients; kept: the export carries it
    assert not any(p.requires_grad for p in module.student.pooler.parameters())
    assert torch.equal(module.student.pooler.dense.weight, teacher.pooler.dense.weight)
    assert all(p.requires_grad for n, p in module.student.named_parameters() if not n.startswith("pooler."))
    assert [t.name for t in module.terms.values()] == [
        "hidden_mse"
    ]  # no predictions: hidden states by default


def test_vocabulary_mismatch_is_refused(teacher: BertForMaskedLM) -> None:
    other = BertForMaskedLM(tiny_bert_config(vocab_size=VOCAB + 1))
    with pytest.raises(ValueError, match="vocabularies differ"):
        DistillationModule(teacher, other)


def test_bad_layer_map_and_unsupported_architecture_are_refused(teacher: BertForMaskedLM) -> None:
    with pytest.raises(ValueError, match="teacher layer 9"):
        DistillationModule(teacher, {"init": "copy"}, objective=[{"term": "hidden", "layers": [[1, 9]]}])
    gpt = GPT2Model(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=4))
    gpt_student = GPT2Model(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match="unsupported architecture"):
        DistillationModule(gpt, gpt_student, objective=[{"term": "relations"}])


def test_attention_term_switches_sdpa_models_to_eager(teacher: BertForMaskedLM) -> None:
    assert teacher.config._attn_implementation == "sdpa"  # transformers' default returns no attention maps
    module = DistillationModule(teacher, {"init": "copy"}, objective=[{"term": "attention"}])
    features = module.teacher_features(make_batch())
    assert features.attentions is not None and len(features.attentions) == 4


def test_saved_student_loads_with_plain_transformers(teacher: BertForMaskedLM, tmp_path) -> None:
    module = DistillationModule(teacher, {"init": "layers", "num_layers": 2})
    module.save_student(tmp_path / "student")
    loaded = AutoModel.from_pretrained(tmp_path / "student")
    batch = make_batch()
    expected = module.student.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert torch.allclose(expected.last_hidden_state, got.last_hidden_state, atol=1e-6)


def test_etd_students_through_the_module(teacher: BertForMaskedLM) -> None:
    sizes = {"num_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16}
    rand = DistillationModule(teacher, {"init": "extract", "strategy": "rand", **sizes}).student
    impt = DistillationModule(
        teacher,
        {
            "init": "extract",
            "strategy": "impt",
            "max_batches": 2,
            **sizes,
            "data": {"class_path": "kd_helpers.FixedBatches", "init_args": {"num_batches": 2}},
        },
        objective=[{"term": "logits"}, {"term": "hidden"}],
    ).student
    for student in (rand, impt):
        config = student.config
        assert (
            config.num_hidden_layers,
            config.hidden_size,
            config.num_attention_heads,
            config.intermediate_size,
        ) == (2, 8, 2, 16)
        assert all(p.requires_grad for p in student.parameters())
    with pytest.raises(ValueError, match="needs data"):
        DistillationModule(teacher, {"init": "extract", "strategy": "impt", **sizes})


def test_attention_term_turns_off_attention_dropout_so_kl_stays_finite() -> None:
    torch.manual_seed(0)
    teacher = BertForMaskedLM(tiny_bert_config(attention_probs_dropout_prob=0.5))
    module = DistillationModule(teacher, {"init": "copy"}, objective=[{"term": "attention", "loss": "kl"}])
    module.student.train()
    batch = make_batch()
    loss, _ = module.objective(module.teacher_features(batch), module.student_features(batch), batch)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)  # a copy of the teacher, with no dropped entries


def test_named_student_of_a_classifier_gets_the_teachers_label_count(tmp_path) -> None:
    from transformers import BertForSequenceClassification

    BertForSequenceClassification(tiny_bert_config(num_labels=2)).save_pretrained(tmp_path / "two_labels")
    teacher = BertForSequenceClassification(tiny_bert_config(num_labels=3))
    module = DistillationModule(teacher, str(tmp_path / "two_labels"), task="sequence-classification")
    assert module.student.config.num_labels == 3 and module.student.classifier.out_features == 3
