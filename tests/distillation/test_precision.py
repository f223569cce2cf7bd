"""bf16-mixed, a half-precision teacher and torch.compile give the same distillation as float32 eager, on CPU."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from kd_helpers import FixedBatches, quiet_trainer
from transformers import BertForMaskedLM

from lightning_kd import DistillationModule, PruningCallback

OBJECTIVE = [{"term": "hidden"}, {"term": "logits"}, {"term": "relations", "layers": "last_layer"}]


class Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any
    ) -> None:
        self.values.append(float(outputs["loss"]))


def distil(
    teacher: BertForMaskedLM,
    steps: int = 6,
    precision: str = "32-true",
    callbacks: list | None = None,
    objective: list | None = None,
    **module_options: Any,
) -> tuple[DistillationModule, list[float]]:
    torch.manual_seed(0)
    module = DistillationModule(
        teacher,
        {"init": "config", "config": {"num_hidden_layers": 2}},
        objective=objective or OBJECTIVE,
        learning_rate=1e-3,
        **module_options,
    )
    losses = Losses()
    trainer = quiet_trainer(max_steps=steps, precision=precision, callbacks=[losses, *(callbacks or [])])
    trainer.fit(module, FixedBatches())
    return module, losses.values


def test_bf16_mixed_runs_both_models_in_bf16_and_follows_float32(teacher: BertForMaskedLM) -> None:
    seen: dict[str, torch.dtype] = {}

    def record(name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
            seen.setdefault(name, out.dtype)

        return hook

    reference, exact = distil(teacher)
    module = DistillationModule(teacher, {"init": "layers", "num_layers": 2}, objective=OBJECTIVE)
    handles = [
        module.teacher.bert.encoder.layer[0].attention.self.query.register_forward_hook(record("teacher")),
        module.student.bert.encoder.layer[0].attention.self.query.register_forward_hook(record("student")),
    ]
    quiet_trainer(max_steps=1, precision="bf16-mixed").fit(module, FixedBatches())
    for handle in handles:
        handle.remove()
    assert seen == {"teacher": torch.bfloat16, "student": torch.bfloat16}

    mixed_module, mixed = distil(teacher, precision="bf16-mixed")
    assert all(torch.isfinite(torch.tensor(mixed)))
    assert mixed == pytest.approx(exact, rel=0.01)
    assert mixed[-1] < mixed[0]  # it learns
    # master weights stay float32; bf16 is only the arithmetic
    assert {p.dtype for p in mixed_module.student.parameters()} == {torch.float32}
    pairs = zip(reference.student.parameters(), mixed_module.student.parameters(), strict=True)
    assert not all(torch.equal(a, b) for a, b in pairs)  # the arithmetic really was bf16


def test_bf16_mixed_losses_are_computed_in_float32(teacher: BertForMaskedLM) -> None:
    # The relation KL of two near distributions is ~1e-5: in bf16 matmuls it is rounding noise, even negative.
    relations = [{"term": "relations", "layers": "last_layer"}]
    _, exact = distil(teacher, steps=3, objective=relations)
    _, mixed = distil(teacher, steps=3, precision="bf16-mixed", objective=relations)
    assert min(mixed) > 0
    assert mixed == pytest.approx(exact, rel=0.01)


def test_bf16_mixed_with_pruning_ends_physically_pruned(teacher: BertForMaskedLM) -> None:
    torch.manual_seed(0)
    module = DistillationModule(teacher, {"init": "copy"}, objective=[{"term": "hidden"}, {"term": "logits"}])
    pruning = PruningCallback({"heads": 0.5, "ffn": 0.5}, interval=2)
    quiet_trainer(max_steps=6, precision="bf16-mixed", callbacks=[pruning]).fit(module, FixedBatches())
    layer = module.student.bert.encoder.layer[0]
    assert layer.attention.self.query.out_features == teacher.config.hidden_size // 2
    assert layer.intermediate.dense.out_features == teacher.config.intermediate_size // 2
    assert all(torch.isfinite(p).all() for p in module.student.parameters())


def test_half_precision_teacher_matches_float32_teacher(teacher: BertForMaskedLM) -> None:
    _, exact = distil(teacher)
    module, half = distil(teacher, teacher_dtype="bfloat16")
    assert {p.dtype for p in module.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in module.student.parameters()} == {torch.float32}
    assert half == pytest.approx(exact, rel=0.01)
    features = module.teacher_features(FixedBatches().batches[0])
    assert {h.dtype for h in features.hidden_states} == {torch.bfloat16}
    # the terms' float32 layers (projections, filters) read it in float32
    assert {h.dtype for h in features.float().hidden_states} == {torch.float32}
    # the teacher still sits outside the checkpoint, whatever its dtype
    assert not any(k.startswith("teacher") for k in module.state_dict())


def test_unknown_teacher_dtype_names_the_choices(teacher: BertForMaskedLM) -> None:
    with pytest.raises(ValueError, match="teacher_dtype 'bf16'.*bfloat16"):
        DistillationModule(teacher, {"init": "copy"}, teacher_dtype="bf16")


def _compiled_equals_eager(teacher: BertForMaskedLM, compile_options: Any, atol: float) -> None:
    pruning = [PruningCallback({"heads": 0.5}, interval=2, prune_at_end=False, expect_copy=False)]
    eager, eager_losses = distil(teacher, steps=4, callbacks=pruning)
    pruning = [PruningCallback({"heads": 0.5}, interval=2, prune_at_end=False, expect_copy=False)]
    compiled, compiled_losses = distil(teacher, steps=4, callbacks=pruning, compile=compile_options)
    # really compiled, in place: a masked LM runs as encoder + prediction head (the head only where losses read)
    assert compiled.student.bert._compiled_call_impl is not None
    assert compiled.student.cls._compiled_call_impl is not None
    assert compiled_losses == pytest.approx(eager_losses, abs=atol)
    assert compiled.student.state_dict().keys() == eager.student.state_dict().keys()
    for (name, a), b in zip(
        eager.student.state_dict().items(), compiled.student.state_dict().values(), strict=True
    ):
        assert torch.allclose(a, b, atol=atol), name


def test_compile_graph_capture_matches_eager(teacher: BertForMaskedLM) -> None:
    # aot_eager traces forward and backward through the mask hooks like inductor does, without C++ builds
    _compiled_equals_eager(teacher, {"backend": "aot_eager"}, atol=1e-5)


@pytest.mark.slow
def test_compile_inductor_matches_eager(teacher: BertForMaskedLM) -> None:
    _compiled_equals_eager(teacher, True, atol=1e-4)


@pytest.mark.parametrize("teacher_dtype", ["bfloat16", "float16"])
def test_teacher_dtype_leaves_every_kind_of_student_and_its_optimizer_in_float32(
    teacher: BertForMaskedLM, teacher_dtype: str, tmp_path: Any
) -> None:
    saved = tmp_path / "saved"
    BertForMaskedLM(teacher.config).save_pretrained(saved)
    specs = {
        "copy": {"init": "copy"},
        "config": {"init": "config", "config": {"num_hidden_layers": 2}},
        "layers": {"init": "layers", "num_layers": 2},
        "extract": {
            "init": "extract",
            "num_layers": 2,
            "hidden_size": 8,
            "num_attention_heads": 2,
            "intermediate_size": 16,
            "strategy": "rand",
        },
        "folder": str(saved),
        "object": BertForMaskedLM(teacher.config),
    }
    for name, spec in specs.items():
        module = DistillationModule(teacher, spec, teacher_dtype=teacher_dtype, learning_rate=1e-3)
        assert {p.dtype for p in module.teacher.parameters()} == {getattr(torch, teacher_dtype)}, name
        assert {p.dtype for p in module.student.parameters()} == {torch.float32}, name
        quiet_trainer(max_steps=1).fit(module, FixedBatches(num_batches=1))
        moments = [
            v for state in module.trainer.optimizers[0].state.values() for v in state.values() if v.ndim > 0
        ]
        assert moments and {m.dtype for m in moments} == {torch.float32}, name
        assert {p.dtype for p in module.student.parameters()} == {torch.float32}, name
