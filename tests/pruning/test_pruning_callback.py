"""PruningCallback (HomoDistil): schedule, masks equal to removal, zero pruned state, exact resume, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kd_helpers import FixedBatches, ResumableBatches, StopAt, make_batch, quiet_trainer, tiny_bert_config
from transformers import AutoModelForMaskedLM, BertForMaskedLM

from lightning_kd import DistillationModule, PruningCallback
from lightning_kd.pruning import unit_counts

TARGET = {"heads": 0.5, "ffn": 0.25, "hidden": 0.5}
OBJECTIVE = [
    {"term": "logits", "temperature": 2.0},
    {"term": "hidden", "layers": "uniform"},
    {"term": "relations", "weight": 0.5},
    {"term": "task", "weight": 0.5},
]


def homodistil(teacher: BertForMaskedLM) -> DistillationModule:
    torch.manual_seed(3)
    return DistillationModule(teacher, {"init": "copy"}, objective=OBJECTIVE, learning_rate=1e-3)


def test_schedule_masks_and_physical_removal(teacher: BertForMaskedLM, tmp_path: Path) -> None:
    module = homodistil(teacher)
    pruning = PruningCallback(
        TARGET, start_step=0, end_step=8, interval=2, prune_at_end=False, physical=False
    )
    trainer = quiet_trainer(max_steps=10, callbacks=[pruning])
    trainer.fit(module, FixedBatches())
    full = {"heads": 4, "ffn": 32, "hidden": 16}
    goal = {"heads": 2, "ffn": 8, "hidden": 8}
    assert [event["step"] for event in pruning.events] == [2, 4, 6, 8]
    for event in pruning.events:
        share = 1 - (1 - event["step"] / 8) ** 3
        for kind in goal:
            per_layer = 4 if kind != "hidden" else 1
            expected = round(full[kind] - (full[kind] - goal[kind]) * share)
            assert event[kind] == per_layer * expected, (event, kind)
    assert float(trainer.callback_metrics["width/heads"]) == 0.5
    assert float(trainer.callback_metrics["width/hidden"]) == 0.5

    # pruned weights and their optimizer state are zero, and stayed zero through the last steps
    optimizer = trainer.optimizers[0]
    for parameter, dim, index in pruning._slices:
        assert parameter.index_select(dim, index).abs().max() == 0
        for state in optimizer.state[parameter].values():
            if torch.is_tensor(state) and state.shape == parameter.shape:
                assert state.index_select(dim, index).abs().max() == 0

    # the masked student computes what the physically pruned one computes, and the latter is smaller
    batch = make_batch(seed=9)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    module.student.eval()
    masked_logits = module.student(**inputs).logits
    masked_terms = module.objective(module.teacher_features(batch), module.student_features(batch), batch)[1]
    pruned = pruning.prune_student(module)
    pruned.eval()
    assert (
        pruned.config.hidden_size,
        pruned.config.num_attention_heads,
        pruned.config.intermediate_size,
    ) == (8, 2, 8)
    assert torch.allclose(pruned(**inputs).logits, masked_logits, atol=1e-5)
    pruned_terms = module.objective(module.teacher_features(batch), module.student_features(batch), batch)[1]
    for name in ("logits_kl", "hidden_mse", "task"):
        assert pruned_terms[name].item() == pytest.approx(masked_terms[name].item(), abs=1e-5), name
    assert sum(p.numel() for p in pruned.parameters()) == pruning.events[-1]["params"]


def test_resumed_run_ends_with_the_same_student(teacher: BertForMaskedLM, tmp_path: Path) -> None:
    def run(
        stop_at: int | None = None, ckpt: str | None = None
    ) -> tuple[DistillationModule, PruningCallback]:
        module = homodistil(teacher)
        pruning = PruningCallback(TARGET, start_step=1, end_step=9, interval=2)
        callbacks = [pruning] + ([StopAt(stop_at)] if stop_at else [])
        trainer = quiet_trainer(max_steps=10, callbacks=callbacks, default_root_dir=tmp_path)
        trainer.fit(module, ResumableBatches(num_batches=3), ckpt_path=ckpt)
        if stop_at:
            trainer.save_checkpoint(tmp_path / "mid.ckpt")
        return module, pruning

    straight, straight_pruning = run()
    run(stop_at=4)  # after the first event, before the second; one batch into the second epoch
    resumed, resumed_pruning = run(ckpt=str(tmp_path / "mid.ckpt"))
    assert straight_pruning.events == resumed_pruning.events
    for kind, mask in straight_pruning.masks.items():
        assert torch.equal(mask, resumed_pruning.masks[kind])
    straight_state, resumed_state = straight.student.state_dict(), resumed.student.state_dict()
    assert straight_state.keys() == resumed_state.keys()
    for name, value in straight_state.items():
        assert torch.equal(value, resumed_state[name]), name


@pytest.mark.parametrize(("max_steps", "end_at"), [(8, 6), (4, 3), (2, 2)])
def test_end_step_as_a_share_of_the_run_scales_with_its_length(
    teacher: BertForMaskedLM, max_steps: int, end_at: int
) -> None:
    pruning = PruningCallback(TARGET, end_step=0.75, interval=1, prune_at_end=False, physical=False)
    quiet_trainer(max_steps=max_steps, callbacks=[pruning]).fit(homodistil(teacher), FixedBatches())
    assert pruning.end_step == end_at and pruning.events[-1]["step"] == end_at
    assert pruning.events[-1]["hidden"] == 8  # the target reached at the scaled end


def test_export_loads_with_plain_transformers(teacher: BertForMaskedLM, tmp_path: Path) -> None:
    module = homodistil(teacher)
    pruning = PruningCallback(TARGET, end_step=4, interval=2, export_dir=str(tmp_path / "student"))
    quiet_trainer(max_steps=4, callbacks=[pruning]).fit(module, FixedBatches())
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "student").eval()
    module.student.eval()
    batch = make_batch(seed=4)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    assert loaded.config.hidden_size == 8
    assert torch.allclose(loaded(**inputs).logits, module.student(**inputs).logits, atol=1e-5)


def test_bad_input_is_refused_before_training(teacher: BertForMaskedLM, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prunes heads, ffn, hidden"):
        PruningCallback({"layers": 0.5})
    with pytest.raises(ValueError, match="between 1 and 4"):
        quiet_trainer(max_steps=4, callbacks=[PruningCallback({"heads": 0})]).fit(
            homodistil(teacher), FixedBatches()
        )
    with pytest.raises(ValueError, match="after the run's last step 4"):
        quiet_trainer(max_steps=4, callbacks=[PruningCallback(TARGET, end_step=6)]).fit(
            homodistil(teacher), FixedBatches()
        )
    # BERT derives the head size from hidden / heads: 4 heads of 4 cannot be saved in 8 dimensions
    with pytest.raises(ValueError, match="at most 2 heads"):
        quiet_trainer(max_steps=4, callbacks=[PruningCallback({"hidden": 8})]).fit(
            homodistil(teacher), FixedBatches()
        )
    with pytest.raises(ValueError, match="would export nothing"):
        PruningCallback(TARGET, export_dir=str(tmp_path / "student"), prune_at_end=False)
    small = DistillationModule(teacher, {"init": "layers", "num_layers": 2})
    other = BertForMaskedLM(tiny_bert_config(hidden_size=8, num_attention_heads=2))
    with pytest.raises(ValueError, match="Use student=\\{'init': 'copy'\\}"):
        quiet_trainer(max_steps=4, callbacks=[PruningCallback(TARGET)]).fit(
            DistillationModule(teacher, other), FixedBatches()
        )
    with pytest.raises(ValueError, match="is not the teacher's"):
        quiet_trainer(max_steps=2, callbacks=[PruningCallback({"heads": 0.5})]).fit(small, FixedBatches())
    shallow = PruningCallback({"heads": 0.5}, end_step=2, interval=1, expect_copy=False)
    quiet_trainer(max_steps=2, callbacks=[shallow]).fit(small, FixedBatches())
    assert small.student.config.num_attention_heads == 2

    module = homodistil(teacher)
    trainer = quiet_trainer(
        max_steps=4,
        callbacks=[PruningCallback(TARGET, end_step=4, interval=2, prune_at_end=False)],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, FixedBatches())
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    other_target = PruningCallback({**TARGET, "hidden": 0.75}, end_step=4)
    with pytest.raises(ValueError, match="pruned towards target"):
        quiet_trainer(max_steps=6, callbacks=[other_target]).fit(
            homodistil(teacher), FixedBatches(), ckpt_path=str(tmp_path / "run.ckpt")
        )


def test_terms_that_read_heads_are_checked_against_the_pruned_width(teacher: BertForMaskedLM) -> None:
    attention = DistillationModule(teacher, {"init": "copy"}, objective=[{"term": "attention"}])
    with pytest.raises(ValueError, match="use the 'relations' term"):
        quiet_trainer(max_steps=2, callbacks=[PruningCallback({"heads": 0.5})]).fit(attention, FixedBatches())
    relations = DistillationModule(
        teacher, {"init": "copy"}, objective=[{"term": "relations", "num_relation_heads": 16}]
    )
    with pytest.raises(ValueError, match="do not divide the 8 dimensions"):
        quiet_trainer(max_steps=2, callbacks=[PruningCallback({"heads": 0.5})]).fit(relations, FixedBatches())


def test_relation_heads_must_divide_every_width_the_schedule_passes_through(teacher: BertForMaskedLM) -> None:
    # 4 heads of 4 dimensions go to 2 through 3: 8 relation heads divide the final 8 dimensions but not 12
    relations = DistillationModule(
        teacher, {"init": "copy"}, objective=[{"term": "relations", "num_relation_heads": 8}]
    )
    pruning = PruningCallback({"heads": 0.5}, interval=1, end_step=4, schedule="linear")
    with pytest.raises(ValueError, match="do not divide the 12 dimensions .*widths \\[8, 12, 16\\].* e.g. 4"):
        quiet_trainer(max_steps=6, callbacks=[pruning]).fit(relations, FixedBatches())
    competing = PruningCallback({"heads": 0.5}, interval=1, end_step=4, same_per_layer=False)
    with pytest.raises(ValueError, match="widths \\[4, 8, 12, 16\\]"):  # any layer may keep any head count
        quiet_trainer(max_steps=6, callbacks=[competing]).fit(relations, FixedBatches())


def test_the_one_line_use_works_as_written(
    teacher: BertForMaskedLM, caplog: pytest.LogCaptureFixture
) -> None:
    """``Trainer(callbacks=[PruningCallback()]).fit(DistillationModule(teacher), data)``: no student is a copy of
    the teacher, no target is HomoBERT-small's shape (a third of each), and both are said."""
    import logging

    from lightning_kd.pruning.callback import HOMOBERT_SMALL

    with caplog.at_level(logging.INFO, logger="lightning_kd"):
        module = DistillationModule(teacher)
        pruning = PruningCallback()
        quiet_trainer(max_steps=4, callbacks=[pruning]).fit(module, FixedBatches())
    assert pruning.target == HOMOBERT_SMALL
    # BERT-tiny's 16 hidden, 4 heads and 32 neurons, a third of each (as 768, 12 and 3,072 become 256, 4, 1,024)
    counts = unit_counts(module.student)
    assert (counts["hidden"], counts["heads"], counts["ffn"]) == (5, [1] * 4, [11] * 4)
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "starts as a copy of the teacher" in messages
    assert "resolves to hidden 16 -> 5, heads 4 -> 1, ffn 32 -> 11" in messages
