"""A run whose loss or gradients stop being finite stops (or skips the step) and never saves non-finite weights."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import lightning as L
import pytest
import torch
from kd_helpers import FixedBatches, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor
from transformers import BertForMaskedLM

from lightning_kd import (
    DistillationModule,
    DistillationReport,
    NonFiniteError,
    NonFiniteGuard,
    PruningCallback,
    export_pretrained,
)
from lightning_kd.objective import Features, KnowledgeTerm, Needs


class Poison(KnowledgeTerm):
    """A term that is 0 (with a real gradient path) except on the calls listed in ``bad``, where it is NaN; with
    ``bad_gradient`` its value stays finite and its gradient is not."""

    kind = "poison"

    def __init__(self, bad: tuple[int, ...], bad_gradient: bool = False) -> None:
        super().__init__(weight=1.0)
        self.bad, self.bad_gradient, self.calls = set(bad), bad_gradient, 0

    def needs(self) -> Needs:
        return Needs(hidden_states=True)

    def forward(self, teacher: Features, student: Features, batch: Mapping[str, Tensor]) -> Tensor:
        hidden = student.hidden_states[-1]
        call, self.calls = self.calls, self.calls + 1
        if call not in self.bad:
            return hidden.sum() * 0.0
        if self.bad_gradient:
            return torch.sqrt(hidden - hidden.detach()).sum()  # value 0, gradient inf
        return hidden.sum() * float("nan")


def module_with(teacher: BertForMaskedLM, poison: Poison) -> DistillationModule:
    torch.manual_seed(0)
    return DistillationModule(
        teacher,
        {"init": "layers", "num_layers": 2},
        objective=[{"term": "hidden"}, poison],
        learning_rate=1e-3,
    )


def finite(module: L.LightningModule) -> bool:
    return all(torch.isfinite(p).all() for p in module.parameters())


def optimizer_state(trainer: L.Trainer) -> dict:
    state = trainer.optimizers[0].state_dict()["state"]
    return {(i, k): v.clone() for i, values in state.items() for k, v in values.items()}


def test_nan_term_stops_the_run_naming_step_term_and_newest_checkpoint(
    teacher: BertForMaskedLM, tmp_path: Path
) -> None:
    module = module_with(teacher, Poison(bad=(3,)))
    checkpoints = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, save_last=True
    )
    report = DistillationReport(export_dir=str(tmp_path / "student"))
    # no logging step before the end: the checkpoint after the bad step is where the host reads the flag
    trainer = quiet_trainer(
        max_steps=8, log_every_n_steps=50, enable_checkpointing=True, callbacks=[checkpoints, report]
    )
    with pytest.raises(NonFiniteError) as caught:
        trainer.fit(module, FixedBatches())
    message = str(caught.value)
    assert "optimizer step 4" in message and "poison = nan" in message
    assert str((tmp_path / "ckpt" / "last.ckpt").resolve()) in message
    assert trainer.global_step == 4
    saved = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "last.ckpt" in saved and "epoch=0-step=3.ckpt" in saved
    assert not any("step=4" in name for name in saved)
    for path in (tmp_path / "ckpt").iterdir():
        state = torch.load(path, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    # the bad update was never applied: weights and AdamW state are the newest checkpoint's, exactly
    newest = torch.load(tmp_path / "ckpt" / "epoch=0-step=3.ckpt", weights_only=False)
    assert all(torch.equal(v, newest["state_dict"][k]) for k, v in module.state_dict().items())
    saved_state = newest["optimizer_states"][0]["state"]
    for (index, key), value in optimizer_state(trainer).items():
        assert torch.equal(value, saved_state[index][key]), (index, key)
    assert all(v["step"].item() == 3 for v in saved_state.values())
    assert not (tmp_path / "student").exists()


def test_stop_decides_on_the_device_and_stops_at_the_next_logging_step(teacher: BertForMaskedLM) -> None:
    module = module_with(teacher, Poison(bad=(3,)))

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
            if trainer.global_step == 3:
                self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}
                self.optimizer = optimizer_state(trainer)

    snapshot = Snapshot()
    trainer = quiet_trainer(max_steps=12, log_every_n_steps=3, callbacks=[snapshot])
    with pytest.raises(
        NonFiniteError,
        match=r"optimizer step 4: terms not finite: poison = nan\. .* nor with "
        r"any later one \(the run stopped at step 6\)",
    ):
        trainer.fit(module, FixedBatches())
    # steps 5 and 6 ran (their batches were finite) but none was applied: the run halted at the bad step
    assert trainer.global_step == 6
    assert all(torch.equal(v, snapshot.weights[k]) for k, v in module.state_dict().items())
    after = optimizer_state(trainer)
    assert after.keys() == snapshot.optimizer.keys()
    assert all(torch.equal(v, snapshot.optimizer[k]) for k, v in after.items())


def test_skip_policy_drops_the_bad_update_and_stops_after_max_skips(teacher: BertForMaskedLM) -> None:
    module = module_with(teacher, Poison(bad=(2,)))
    guard = NonFiniteGuard(policy="skip", max_skips=1)
    trainer = quiet_trainer(max_steps=5, callbacks=[guard])
    trainer.fit(module, FixedBatches())
    assert guard.skipped == [3] and trainer.global_step == 5 and finite(module)
    assert guard.state_dict() == {"skipped": [3]}
    # the module did not add a second, stopping guard beside the one the trainer has
    assert sum(isinstance(c, NonFiniteGuard) for c in trainer.callbacks) == 1

    module = module_with(teacher, Poison(bad=(1, 2)))
    with pytest.raises(NonFiniteError, match="optimizer step 3 after skipping steps \\[2\\]"):
        quiet_trainer(max_steps=5, callbacks=[NonFiniteGuard(policy="skip", max_skips=1)]).fit(
            module, FixedBatches()
        )


def test_skipped_step_leaves_weights_and_optimizer_state_as_they_were(teacher: BertForMaskedLM) -> None:
    module = module_with(teacher, Poison(bad=(2,)))  # the third forward: optimizer step 3

    def state(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """The weights, and AdamW's moments and step count of every parameter."""
        optimizer = trainer.optimizers[0]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        moments = {
            f"{names[id(p)]}.{key}": torch.as_tensor(value).clone()
            for p, values in optimizer.state.items()
            for key, value in values.items()
        }
        return {**{k: v.clone() for k, v in pl_module.state_dict().items()}, **moments}

    class Snapshot(L.Callback):
        def __init__(self) -> None:
            self.after: dict[int, dict[str, torch.Tensor]] = {}

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
            self.after[trainer.global_step] = state(trainer, pl_module)

    snapshot, guard = Snapshot(), NonFiniteGuard(policy="skip")
    # no logging step in the run: the update is dropped on the device, and reported at the end
    quiet_trainer(max_steps=4, log_every_n_steps=50, callbacks=[guard, snapshot]).fit(module, FixedBatches())
    assert guard.skipped == [3]
    one, two, three = snapshot.after[1], snapshot.after[2], snapshot.after[3]
    assert any(name.endswith(".exp_avg_sq") for name in two) and any(name.endswith(".step") for name in two)
    # a good step moves every moment and step count (so the comparison below can fail) ...
    moved = [name for name in two if name.endswith((".exp_avg", ".exp_avg_sq", ".step"))]
    assert moved and all(not torch.equal(one[name], two[name]) for name in moved)
    # ... the skipped one moves nothing: no weight, moment or step count
    assert two.keys() == three.keys()
    for name, value in two.items():
        assert torch.equal(value, three[name]), name


def test_non_finite_gradient_with_a_finite_loss_is_caught(teacher: BertForMaskedLM) -> None:
    module = module_with(teacher, Poison(bad=(1,), bad_gradient=True))
    with pytest.raises(
        NonFiniteError,
        match="optimizer step 2: gradients not finite \\(or too large to square in float32\\) in .* parameters, first ",
    ):
        quiet_trainer(max_steps=4).fit(module, FixedBatches())
    assert finite(module)


def test_guard_reads_gradients_before_pruning_scores_them(teacher: BertForMaskedLM) -> None:
    torch.manual_seed(0)
    module = DistillationModule(teacher, {"init": "copy"}, objective=[{"term": "hidden"}, Poison(bad=(2,))])
    pruning = PruningCallback({"ffn": 0.5}, interval=2)
    guard = NonFiniteGuard(policy="skip")
    trainer = quiet_trainer(max_steps=4, callbacks=[pruning, guard])
    trainer.fit(module, FixedBatches())
    assert trainer.callbacks.index(guard) < trainer.callbacks.index(pruning)
    assert all(torch.isfinite(v).all() for v in pruning.scorer.state_dict().values())
    assert guard.skipped == [3]


def test_no_checkpoint_or_export_from_non_finite_weights(teacher: BertForMaskedLM, tmp_path: Path) -> None:
    class Corrupt(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
            if trainer.global_step == 2:
                with torch.no_grad():
                    next(pl_module.student.parameters()).fill_(float("inf"))

    module = module_with(teacher, Poison(bad=()))
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    trainer = quiet_trainer(max_steps=4, enable_checkpointing=True, callbacks=[Corrupt(), checkpoints])
    with pytest.raises(NonFiniteError, match="refusing to write a checkpoint: 1 parameters are not finite"):
        trainer.fit(module, FixedBatches())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=1.ckpt"]
    with pytest.raises(ValueError, match="not exporting .* not finite"):
        export_pretrained(module.student, tmp_path / "student")
    assert not (tmp_path / "student").exists()


def test_guard_options_and_infinite_weights_are_refused(teacher: BertForMaskedLM) -> None:
    with pytest.raises(ValueError, match="unknown non-finite policy 'ignore'"):
        NonFiniteGuard(policy="ignore")
    with pytest.raises(ValueError, match="weight inf: weights must be finite"):
        DistillationModule(teacher, {"init": "copy"}, objective=[{"term": "hidden", "weight": float("inf")}])


def test_an_optimizer_that_takes_no_flag_has_the_bad_steps_gradients_dropped(
    teacher: BertForMaskedLM,
) -> None:
    class PlainSGD(DistillationModule):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)  # not fused: no found_inf

    torch.manual_seed(0)
    module = PlainSGD(
        teacher, {"init": "layers", "num_layers": 2}, objective=[{"term": "hidden"}, Poison(bad=(2,))]
    )
    weights = {}

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
            weights[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    guard = NonFiniteGuard(policy="skip")
    quiet_trainer(max_steps=4, log_every_n_steps=50, callbacks=[guard, Snapshot()]).fit(
        module, FixedBatches()
    )
    assert guard.skipped == [3]
    assert all(torch.equal(v, weights[2][k]) for k, v in weights[3].items())
    assert not all(torch.equal(v, weights[3][k]) for k, v in weights[4].items())  # the next step did train
