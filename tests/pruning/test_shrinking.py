"""HomoDistil that shrinks at every event: the same student as the masked run, state that follows, resume,
checkpoints that shrink, a rounded schedule, and torch.compile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from kd_helpers import FixedBatches, quiet_trainer, tiny_bert_config
from transformers import BertForMaskedLM

from lightning_kd import DistillationModule, PruningCallback
from lightning_kd.models import get_adapter
from lightning_kd.pruning import unit_counts

TARGET = {"heads": 0.5, "ffn": 0.25, "hidden": 0.5}
# a real MLM objective: prediction KL, hidden states, and the student's own masked-token loss
OBJECTIVE = [
    {"term": "logits", "temperature": 2.0},
    {"term": "hidden", "layers": "uniform"},
    {"term": "task", "weight": 0.5},
]


@pytest.fixture
def dropout_teacher() -> BertForMaskedLM:
    torch.manual_seed(0)
    # residual-stream dropout on; the attention-probability dropout would draw per head, which no shrunk model
    # can reproduce (see docs/homodistil.md)
    return BertForMaskedLM(tiny_bert_config(hidden_dropout_prob=0.1)).eval()


class ShapeLog(L.Callback):
    """After every event: the student's real size, no hooks, and optimizer state shaped like the parameters."""

    def __init__(self, pruning: PruningCallback) -> None:
        self.pruning, self.rows = pruning, []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.pruning.last_event != trainer.global_step:
            return
        student = pl_module.student
        # transformers installs output-capturing hooks of its own; count the library's (the masks)
        hooks = sum(
            getattr(hook, "__module__", "").startswith("lightning_kd")
            for m in student.modules()
            for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
        )
        optimizer = trainer.optimizers[0]
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        trainable = {id(p) for p in pl_module.parameters() if p.requires_grad}
        state_ok = all(
            value.shape == p.shape
            for p, state in optimizer.state.items()
            for value in state.values()
            if value.ndim > 0
        )
        self.rows.append(
            {
                "params": sum(p.numel() for p in student.parameters()),
                "hooks": hooks,
                "counts": unit_counts(student),
                "optimized_is_trainable": optimized == trainable,
                "state_shaped": state_ok,
                "state_step": [float(s["step"]) for s in optimizer.state.values()],
                "dropouts": {type(m).__name__ for m in student.modules() if "Dropout" in type(m).__name__},
            }
        )


def _log(trainer: L.Trainer) -> list[dict]:
    return next(c for c in trainer.callbacks if isinstance(c, ShapeLog)).rows


def distil(
    teacher: BertForMaskedLM, pruning: PruningCallback, steps: int = 10, **module_kwargs: Any
) -> tuple[DistillationModule, L.Trainer]:
    L.seed_everything(5)
    module = DistillationModule(
        teacher, {"init": "copy"}, objective=OBJECTIVE, learning_rate=1e-3, **module_kwargs
    )
    trainer = quiet_trainer(max_steps=steps, callbacks=[pruning, ShapeLog(pruning)])
    trainer.fit(module, FixedBatches())
    return module, trainer


def test_shrunk_run_equals_masked_run(dropout_teacher: BertForMaskedLM, tmp_path: Path) -> None:
    shrink = PruningCallback(TARGET, end_step=8, interval=2, prune_at_end=False, align_dropout=True)
    shrunk, shrunk_trainer = distil(dropout_teacher, shrink)
    mask = PruningCallback(TARGET, end_step=8, interval=2, prune_at_end=False, physical=False)
    masked, masked_trainer = distil(dropout_teacher, mask)

    # the same decisions, and the shrunk student really was that small after each event, with no hooks
    assert [e["step"] for e in shrink.events] == [2, 4, 6, 8]
    assert shrink.events == mask.events
    for kind in TARGET:
        assert torch.equal(shrink.masks[kind], mask.masks[kind])
    log = _log(shrunk_trainer)
    assert [row["params"] for row in log] == [e["params"] for e in shrink.events]
    assert all(row["hooks"] == 0 and row["optimized_is_trainable"] and row["state_shaped"] for row in log)
    assert [row["counts"]["hidden"] for row in log] == [e["hidden"] for e in shrink.events]
    assert all(
        set(row["state_step"]) == {float(e["step"])} for row, e in zip(log, shrink.events, strict=True)
    )
    assert shrunk.student.config.hidden_size == 8 and shrunk.student.config.intermediate_size == 8
    assert all("WideDropout" in row["dropouts"] for row in log)  # aligned: drawn at the starting width

    # checkpoints: the shrunk run's is smaller, and loads back into its shapes
    shrunk_trainer.save_checkpoint(tmp_path / "shrunk.ckpt")
    masked_trainer.save_checkpoint(tmp_path / "masked.ckpt")
    assert (tmp_path / "shrunk.ckpt").stat().st_size < 0.75 * (tmp_path / "masked.ckpt").stat().st_size
    # the checkpoint holds no teacher weights (they are kept out of state_dict): the teacher is given again
    loaded = DistillationModule.load_from_checkpoint(tmp_path / "shrunk.ckpt", teacher=dropout_teacher)
    assert loaded.student.config.hidden_size == 8 and loaded.student.config.intermediate_size == 8
    assert loaded.state_dict().keys() == shrunk.state_dict().keys()
    for name, value in shrunk.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name

    # after the same steps, with dropout on, the same student (and the same objective) to float tolerance
    mask.prune_student(masked)
    shrink.prune_student(shrunk)
    assert type(shrunk.student) is BertForMaskedLM
    assert all(type(m) is torch.nn.Dropout for m in shrunk.student.modules() if "Dropout" in type(m).__name__)
    expected, actual = masked.state_dict(), shrunk.state_dict()
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        assert torch.allclose(value, actual[name], atol=2e-6), (name, (value - actual[name]).abs().max())


def test_by_default_a_shrunk_student_draws_its_dropout_at_its_own_width(
    dropout_teacher: BertForMaskedLM,
) -> None:
    """Drawing at the starting width costs up to 1/keep times the random numbers: only when asked for."""
    pruning = PruningCallback(TARGET, end_step=4, interval=2, prune_at_end=False)
    module, trainer = distil(dropout_teacher, pruning, steps=6)
    log = _log(trainer)
    assert [row["counts"]["hidden"] for row in log] == [e["hidden"] for e in pruning.events] == [9, 8]
    assert all(row["dropouts"] == {"Dropout"} for row in log)
    assert torch.isfinite(torch.cat([p.reshape(-1) for p in module.student.parameters()])).all()


@pytest.mark.parametrize(
    "options",
    [
        {"target": {"heads": 0.5, "ffn": 0.25}, "same_per_layer": False, "importance": "sensitivity"},
        {"target": {"hidden": 0.5, "heads": 0.5}, "schedule": "linear", "start_step": 1},
    ],
)
def test_shrinking_equals_masking_across_settings(dropout_teacher: BertForMaskedLM, options: dict) -> None:
    """Ragged layers (units compete across layers), the other scorer, another schedule and start."""
    results = []
    for physical in (True, False):
        pruning = PruningCallback(
            **options, end_step=5, interval=2, prune_at_end=False, physical=physical, align_dropout=True
        )
        module, _ = distil(dropout_teacher, pruning, steps=6)
        results.append((module, pruning))
    (shrunk, shrink), (masked, mask) = results
    assert shrink.events == mask.events and len(shrink.events) >= 2
    mask.prune_student(masked)
    shrink.prune_student(shrunk)
    if not options.get("same_per_layer", True):
        assert len(set(unit_counts(shrunk.student)["ffn"])) > 1  # the layers really kept different counts
    for name, value in masked.state_dict().items():
        assert torch.allclose(value, shrunk.state_dict()[name], atol=2e-6), name


def test_a_rounded_schedule_changes_shape_a_bounded_number_of_times(teacher: BertForMaskedLM) -> None:
    pruning = PruningCallback(TARGET, end_step=8, interval=1, granularity={"hidden": 4, "ffn": 8})
    module, trainer = distil(teacher, pruning)
    hidden = [e["hidden"] for e in pruning.events]
    ffn = [e["ffn"] // 4 for e in pruning.events]  # per layer
    assert len(pruning.events) == 8 and hidden[-1] == 8 and ffn[-1] == 8
    assert all(h % 4 == 0 for h in hidden) and all(f % 8 == 0 for f in ffn)
    # one shape per multiple passed at most, whatever the number of events
    shapes = [(16, 32)] + [(h, f) for h, f in zip(hidden, ffn, strict=True)]
    changes = sum(a != b for a, b in zip(shapes, shapes[1:], strict=False))
    assert changes <= (16 - 8) // 4 + (32 - 8) // 8
    assert unit_counts(module.student)["hidden"] == 8 and module.student.config.intermediate_size == 8
    with pytest.raises(ValueError, match="granularity"):
        PruningCallback(TARGET, granularity={"hidden": 0})


def test_compiled_shrinking_equals_eager(teacher: BertForMaskedLM) -> None:
    eager_pruning = PruningCallback(TARGET, end_step=4, interval=2, prune_at_end=False)
    eager, _ = distil(teacher, eager_pruning, steps=5)
    compiled_pruning = PruningCallback(TARGET, end_step=4, interval=2, prune_at_end=False)
    compiled, _ = distil(teacher, compiled_pruning, steps=5, compile={"backend": "aot_eager"})
    # a masked LM is compiled as its encoder and its head (the module runs the head at masked positions only)
    parts = get_adapter(compiled.student).masked_lm_parts(compiled.student)
    assert parts.encoder._compiled_call_impl is not None and parts.head._compiled_call_impl is not None
    assert compiled.student.config.hidden_size == eager.student.config.hidden_size == 8
    for name, value in eager.student.state_dict().items():
        assert torch.allclose(value, compiled.student.state_dict()[name], atol=1e-5), name


def test_masks_with_compile_are_refused(teacher: BertForMaskedLM) -> None:
    module = DistillationModule(teacher, {"init": "copy"}, compile={"backend": "aot_eager"})
    masked = PruningCallback(TARGET, end_step=2, interval=1, physical=False)
    with pytest.raises(ValueError, match="does not re-read"):
        quiet_trainer(max_steps=2, callbacks=[masked]).fit(module, FixedBatches())


def test_a_checkpoint_resumes_only_into_its_own_mode(teacher: BertForMaskedLM, tmp_path: Path) -> None:
    module, trainer = distil(
        teacher, PruningCallback(TARGET, end_step=4, interval=2, prune_at_end=False), steps=4
    )
    trainer.save_checkpoint(tmp_path / "shrunk.ckpt")
    other = PruningCallback(TARGET, end_step=4, interval=2, physical=False)
    fresh = DistillationModule(teacher, {"init": "copy"}, objective=OBJECTIVE, learning_rate=1e-3)
    with pytest.raises(ValueError, match="physical=True"):
        quiet_trainer(max_steps=6, callbacks=[other]).fit(
            fresh, FixedBatches(), ckpt_path=tmp_path / "shrunk.ckpt"
        )
