"""PLATON as its authors ran it: a window of delta_t steps, and only steps the optimizer takes count."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from kd_helpers import BadLossAt, FixedBatches, quiet_trainer
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor
from transformers import BertForMaskedLM

from lightning_kd import DistillationModule, NonFiniteGuard, PruningCallback
from lightning_kd.pruning import importance
from lightning_kd.pruning.importance import PlatonImportance

# run alone, pytest puts only this folder on the path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "callbacks"))
from test_nonfinite import Poison  # noqa: E402


def scripted(monkeypatch: pytest.MonkeyPatch, values: list[float]) -> None:
    steps = iter(values)
    monkeypatch.setattr(
        importance,
        "sensitivity_on_device",
        lambda model, kinds=None, scratch=None: {"ffn": torch.full((1, 2), next(steps))},
    )


def test_platon_window_averages_delta_t_steps_before_the_emas(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted(monkeypatch, [2.0, 4.0, float("nan"), 8.0, 6.0])
    scorer = PlatonImportance(beta1=0.5, beta2=0.5, delta_t=2)
    scorer.update(None)
    assert "ffn.mean" not in scorer.state
    with pytest.raises(RuntimeError, match="first window of 2 steps has not closed"):
        scorer.scores()
    scorer.update(None)
    mean = 0.5 * 3.0  # the window's average, (2 + 4) / 2
    assert scorer.state["ffn.mean"][0, 0] == pytest.approx(mean)
    assert scorer.state["ffn.uncertainty"][0, 0] == pytest.approx(0.5 * abs(3.0 - mean))
    scorer.update(None)  # NaN sensitivities: not counted
    scorer.update(None, taken=torch.tensor(True))
    assert scorer.state["ffn.mean"][0, 0] == pytest.approx(0.5 * mean + 0.5 * 8.0)  # the window is 8 alone
    scorer.update(None, taken=torch.tensor(False))  # a step the GradScaler skips
    assert float(scorer.state["window.steps"]) == 0.0


def test_a_skipped_fp16_step_does_not_poison_the_importance(teacher: BertForMaskedLM) -> None:
    torch.manual_seed(0)
    # step 3's gradients overflow (inf) while its loss stays finite: 16-mixed's GradScaler skips that step
    module = DistillationModule(
        teacher, {"init": "copy"}, objective=[{"term": "hidden"}, Poison(bad=(2,), bad_gradient=True)]
    )
    pruning = PruningCallback({"ffn": 0.5, "heads": 0.5}, interval=2, end_step=6, physical=False)
    # Lightning turns 16-mixed into bf16-mixed on a CPU; this keeps fp16 and its GradScaler, as on a GPU
    fp16 = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    quiet_trainer(max_steps=6, plugins=[fp16], callbacks=[pruning]).fit(module, FixedBatches())
    state = pruning.scorer.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())
    scores = pruning.scorer.scores()["ffn"]
    assert torch.isfinite(scores).all() and scores.std() > 0  # ranked by importance, not by index


class GuardLast(NonFiniteGuard):
    """A guard that stays where the trainer's list has it: after the pruning callback."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pass


class ScorerAfterEachStep(L.Callback):
    def __init__(self, pruning: PruningCallback) -> None:
        self.pruning = pruning
        self.state: dict[int, dict[str, Tensor]] = {}
        self.finite_gradients: dict[int, bool] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.finite_gradients[trainer.global_step + 1] = all(bool(torch.isfinite(g).all()) for g in grads)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.state[trainer.global_step] = {k: v.clone() for k, v in self.pruning.scorer.state.items()}


@pytest.mark.parametrize("guard_cls", [NonFiniteGuard, GuardLast], ids=["guard-first", "guard-last"])
def test_a_step_the_guard_skips_for_its_loss_alone_does_not_count(
    teacher: BertForMaskedLM, guard_cls: type[NonFiniteGuard]
) -> None:
    torch.manual_seed(0)
    # a two-layer student differs from the teacher from the start: every taken step moves the statistics
    module = DistillationModule(
        teacher,
        {"init": "layers", "num_layers": 2},
        objective=[{"term": "hidden"}, BadLossAt(bad=2, finite_gradient=True)],  # optimizer step 3
        learning_rate=1e-3,
    )
    pruning = PruningCallback({"ffn": 0.5, "heads": 0.5}, interval=4, expect_copy=False, physical=False)
    guard, seen = guard_cls(policy="skip"), ScorerAfterEachStep(pruning)
    trainer = quiet_trainer(max_steps=4, callbacks=[pruning, guard, seen])
    trainer.fit(module, FixedBatches())
    assert guard.skipped == [3]
    assert (trainer.callbacks.index(guard) < trainer.callbacks.index(pruning)) == (
        guard_cls is NonFiniteGuard
    )
    # the scorer's own finiteness check cannot tell: the skipped step's gradients were finite
    assert seen.finite_gradients == {1: True, 2: True, 3: True, 4: True}
    one, two, three = seen.state[1], seen.state[2], seen.state[3]
    assert any(not torch.equal(one[key], two[key]) for key in two)  # a taken step moves them ...
    assert two.keys() == three.keys()
    for key, value in two.items():  # ... the skipped one does not
        assert torch.equal(value, three[key]), key


def test_first_event_before_the_first_window_is_refused_and_the_callback_pickles(
    teacher: BertForMaskedLM,
) -> None:
    module = DistillationModule(teacher, {"init": "copy"}, objective=[{"term": "hidden"}])
    with pytest.raises(
        ValueError, match="first pruning event \\(step 2\\) comes before PLATON's first window of delta_t=10"
    ):
        quiet_trainer(max_steps=6, callbacks=[PruningCallback({"ffn": 0.5}, interval=2, delta_t=10)]).fit(
            module, FixedBatches()
        )
    # ddp_spawn pickles the callback into every process
    restored = pickle.loads(pickle.dumps(PruningCallback({"ffn": 0.5}, schedule="cubic")))
    assert restored.schedule(0.5) == pytest.approx(0.875)


def test_head_dim_statistics_follow_the_heads_a_gradual_shrink_removes(teacher: BertForMaskedLM) -> None:
    torch.manual_seed(0)
    module = DistillationModule(teacher, {"init": "copy"}, objective=[{"term": "hidden"}])
    pruning = PruningCallback({"heads": 0.5}, interval=1, end_step=4, schedule="linear")
    quiet_trainer(max_steps=6, callbacks=[pruning]).fit(module, FixedBatches())
    heads = module.student.config.num_attention_heads
    assert heads < teacher.config.num_attention_heads
    for key in ("heads.mean", "heads.uncertainty", "heads.window"):
        assert pruning.scorer.state[key].shape[1] == heads
    assert not any(key.startswith("head_dims") for key in pruning.scorer.state)  # only what pruning reads
    # a scorer that does keep per-head dimension statistics re-packs them with the heads
    scorer = PlatonImportance(kinds=["heads", "head_dims"])
    scorer.state = {"head_dims.mean": torch.arange(2 * 4 * 3.0).reshape(2, 4, 3)}
    kept = torch.tensor([[True, False, True, False], [False, True, True, True]])
    scorer.keep_units({"heads": kept})
    packed = scorer.state["head_dims.mean"]
    assert packed.shape == (2, 3, 3)
    assert torch.equal(packed[0, :2], torch.arange(24.0).reshape(2, 4, 3)[0, [0, 2]])
    assert torch.equal(packed[1], torch.arange(24.0).reshape(2, 4, 3)[1, [1, 2, 3]])


def test_sensitivity_is_theta_times_grad_summed_per_unit_where_an_embedding_gradient_is_sparse(
    teacher: BertForMaskedLM,
) -> None:
    """The scorer reads a word embedding's rows that have a gradient only (a CPU shortcut) and reuses one buffer
    for every product: the sums must be the definition's, and a NaN in one of those rows must still show."""
    import copy

    from lightning_kd.pruning.importance import Sensitivity
    from lightning_kd.pruning.sensitivity import unit_sensitivity
    from lightning_kd.pruning.units import axes, unit_counts

    model = copy.deepcopy(teacher)
    generator = torch.Generator().manual_seed(0)
    for parameter in model.parameters():
        parameter.grad = torch.randn(parameter.shape, generator=generator)
    words = model.bert.embeddings.word_embeddings.weight
    words.grad.zero_()
    words.grad[[3, 17, 40]] = torch.randn(3, words.shape[1], generator=generator)
    counts = unit_counts(model)
    expected = {
        "heads": torch.zeros(counts["layers"], max(counts["heads"])),
        "ffn": torch.zeros(counts["layers"], max(counts["ffn"])),
        "hidden": torch.zeros(counts["hidden"]),
    }
    for axis in axes(model):
        product = (axis.parameter.detach() * axis.parameter.grad).abs().movedim(axis.dim, 0)
        per_entry = product.reshape(product.shape[0], -1).sum(1)
        if axis.kind == "hidden":
            expected["hidden"] += per_entry
        elif axis.kind == "ffn":
            expected["ffn"][axis.layer] += per_entry
        else:
            expected["heads"][axis.layer] += per_entry.reshape(counts["heads"][axis.layer], -1).sum(1)
    scores = unit_sensitivity(model, kinds=["heads", "ffn", "hidden"])
    for kind, value in expected.items():
        torch.testing.assert_close(scores[kind], value, rtol=1e-5, atol=1e-5)
    scorer = Sensitivity(kinds=["hidden"])
    scorer.update(model)
    words.grad[17, 0] = float("nan")
    assert torch.isnan(unit_sensitivity(model, kinds=["hidden"])["hidden"][0])
    scorer.update(model)  # a step with a NaN gradient does not count
    torch.testing.assert_close(scorer.scores()["hidden"], expected["hidden"], rtol=1e-5, atol=1e-5)
    # the product buffer stays with this process: a pickled scorer (ddp_spawn) carries its statistics only
    assert scorer._scratch and not pickle.loads(pickle.dumps(scorer))._scratch
