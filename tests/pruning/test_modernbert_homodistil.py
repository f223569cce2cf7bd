"""HomoDistil and the unified objective on ModernBERT: every term reads the fused map and both attention kinds,
a shrunk run equals the masked one, a run resumed mid-pruning ends with the same student, and the export loads."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from kd_helpers import VOCAB, ResumableBatches, StopAt, make_batch, quiet_trainer
from transformers import AutoModelForMaskedLM, ModernBertConfig, ModernBertForMaskedLM

from lightning_kd import DistillationModule, PruningCallback
from lightning_kd.pruning import unit_counts

TARGET = {"heads": 0.5, "ffn": 0.25, "hidden": 0.5}  # 2 heads of 4 in 8 dims: an exportable ModernBERT
OBJECTIVE = [
    {"term": "logits", "temperature": 2.0},
    {"term": "hidden", "layers": "uniform"},
    {"term": "relations", "weight": 0.5},
    {"term": "task", "weight": 0.5},
]
# A masked student's queries keep their full width (zero where heads went), so relation heads split them
# differently from a shrunk student's: the runs are compared without that term, as for BERT (test_shrinking.py).
SHRINK_OBJECTIVE = [term for term in OBJECTIVE if term["term"] != "relations"]


def tiny_modernbert(**overrides: object) -> ModernBertForMaskedLM:
    """The 4-layer, 16-wide model of the module tests, as a ModernBERT: layers 0 and 3 global, 1 and 2 local
    (2 tokens each side, so padding and the window both matter at length 10)."""
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=32,
        max_position_embeddings=64,
        local_attention=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
        attn_implementation="eager",
    )
    settings.update(overrides)
    torch.manual_seed(0)
    return ModernBertForMaskedLM(ModernBertConfig(**settings)).eval()


@pytest.fixture(scope="module")
def modernbert() -> ModernBertForMaskedLM:
    return tiny_modernbert()


def test_every_term_is_zero_for_a_copy_and_reads_both_attention_kinds(
    modernbert: ModernBertForMaskedLM,
) -> None:
    objective = [
        {"term": "logits", "temperature": 2.0},
        {"term": "hidden", "layers": "uniform"},
        {"term": "attention", "layers": "uniform"},
        {"term": "relations", "relations": ["qq", "kk", "vv"]},
    ]
    module = DistillationModule(modernbert, {"init": "copy"}, objective=objective)
    batch = module.prepare_batch(make_batch(seed=2))
    teacher, student = module.teacher_features(batch), module.student_features(batch)
    # the head ran only at the masked positions a loss reads
    assert teacher.logits.shape == (int((batch["labels"] != -100).sum()), VOCAB)
    assert len(student.attentions) == 4 and set(student.qkv) == {
        4
    }  # relations read the last block by default
    local = student.attentions[1][0, 0]  # a sliding layer: no weight beyond 2 tokens away
    assert local[0, 5:].abs().max() == 0 and student.attentions[0][0, 0][0, 5:7].min() > 0  # 7-9 are padding
    total, terms = module.objective(teacher, student, batch)
    assert all(value.abs().item() < 1e-6 for value in terms.values()), terms
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in module.student.model.layers:  # only the fused maps change
            layer.attn.Wqkv.weight.add_(torch.randn_like(layer.attn.Wqkv.weight))
    terms = module.objective(module.teacher_features(batch), module.student_features(batch), batch)[1]
    assert all(value.item() > 1e-6 for value in terms.values()), terms


def distil(
    teacher: ModernBertForMaskedLM, pruning: PruningCallback, steps: int = 10, **fit: object
) -> DistillationModule:
    L.seed_everything(5)
    objective = fit.pop("objective", OBJECTIVE)
    module = DistillationModule(teacher, {"init": "copy"}, objective=objective, learning_rate=1e-3)
    callbacks = [pruning, *fit.pop("callbacks", [])]
    trainer = quiet_trainer(max_steps=steps, callbacks=callbacks, default_root_dir=fit.pop("root", None))
    trainer.fit(module, ResumableBatches(num_batches=fit.pop("batches", 4)), **fit)
    module.trainer_ = trainer
    return module


def test_shrunk_run_equals_masked_run(tmp_path: Path) -> None:
    teacher = tiny_modernbert(embedding_dropout=0.1)  # residual-stream dropout on: WideDropout must follow
    shrink = PruningCallback(TARGET, end_step=8, interval=2, prune_at_end=False, align_dropout=True)
    shrunk = distil(teacher, shrink, objective=SHRINK_OBJECTIVE)
    mask = PruningCallback(TARGET, end_step=8, interval=2, prune_at_end=False, physical=False)
    masked = distil(teacher, mask, objective=SHRINK_OBJECTIVE)
    assert [e["step"] for e in shrink.events] == [2, 4, 6, 8] and shrink.events == mask.events
    counts = unit_counts(shrunk.student)
    assert counts["heads"] == [2] * 4 and counts["ffn"] == [8] * 4 and counts["hidden"] == 8
    assert shrunk.student.model.layers[0].attn.Wqkv.out_features == 3 * 2 * 4  # q, k and v of 2 heads
    assert shrunk.student.model.layers[0].mlp.Wi.out_features == 2 * 8  # both halves of 8 neurons
    mask.prune_student(masked)
    shrink.prune_student(shrunk)
    expected, actual = masked.state_dict(), shrunk.state_dict()
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        assert torch.allclose(value, actual[name], atol=2e-6), (name, (value - actual[name]).abs().max())
    # the export is plain transformers, computing what the student computes
    shrunk.save_student(tmp_path / "s")
    # (sdpa and eager differ at padding rows whose sliding window holds only padding: load as the student runs)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "s", attn_implementation="eager").eval()
    assert (loaded.config.hidden_size, loaded.config.num_attention_heads) == (8, 2)
    shrunk.student.eval()
    inputs = {k: v for k, v in make_batch(seed=4).items() if k != "labels"}
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, shrunk.student(**inputs).logits, atol=1e-5)


def test_resumed_run_ends_with_the_same_student(modernbert: ModernBertForMaskedLM, tmp_path: Path) -> None:
    def run(
        stop_at: int | None = None, ckpt: str | None = None
    ) -> tuple[DistillationModule, PruningCallback]:
        pruning = PruningCallback(TARGET, start_step=1, end_step=9, interval=2)
        callbacks = [StopAt(stop_at)] if stop_at else []
        module = distil(modernbert, pruning, callbacks=callbacks, root=tmp_path, batches=3, ckpt_path=ckpt)
        if stop_at:
            module.trainer_.save_checkpoint(tmp_path / "mid.ckpt")
        return module, pruning

    straight, straight_pruning = run()
    run(stop_at=4)  # after the first event, with the student already smaller; one batch into epoch 2
    resumed, resumed_pruning = run(ckpt=str(tmp_path / "mid.ckpt"))
    assert straight_pruning.events == resumed_pruning.events
    straight_state, resumed_state = straight.student.state_dict(), resumed.student.state_dict()
    assert straight_state.keys() == resumed_state.keys()
    for name, value in straight_state.items():
        assert torch.equal(value, resumed_state[name]), name


class CountBatches(L.Callback):
    def __init__(self) -> None:
        self.started = 0

    def on_train_batch_start(self, *args: object) -> None:
        self.started += 1


def test_a_target_no_export_can_hold_is_refused_before_training(modernbert: ModernBertForMaskedLM) -> None:
    pruning, batches = PruningCallback({"hidden": 10, "heads": 2}, end_step=4, interval=2), CountBatches()
    with pytest.raises(ValueError, match="keep the hidden size a multiple of 4"):
        distil(modernbert, pruning, steps=4, callbacks=[batches])
    assert batches.started == 0  # refused when fit starts, not at the first event (step 2)
