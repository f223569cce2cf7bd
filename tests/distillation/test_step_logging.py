"""The training step logs what the loggers read and no more: ``train/loss`` every step, the terms and the
discrepancy on logging steps only (each ``self.log`` costs Lightning's bookkeeping on the host)."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
from kd_helpers import FixedBatches, quiet_trainer
from transformers import BertForMaskedLM

from lightning_kd import DistillationModule
from lightning_kd.training.lightning_internals import logs_this_step


def test_terms_are_logged_on_logging_steps_only(
    teacher: BertForMaskedLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = DistillationModule(teacher, {"init": "layers", "num_layers": 2}, objective=[{"term": "hidden"}])
    keys: dict[int, list[str]] = {}
    log = L.LightningModule.log

    def recording_log(self: L.LightningModule, name: str, *args: Any, **kwargs: Any) -> None:
        if self.trainer.training and name.startswith(("train/", "discrepancy/")):
            keys.setdefault(self.trainer.global_step, []).append(name)
        log(self, name, *args, **kwargs)

    monkeypatch.setattr(L.LightningModule, "log", recording_log)
    logging: dict[int, bool] = {}

    class Steps(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            logging[trainer.global_step] = logs_this_step(trainer)

    trainer = quiet_trainer(max_steps=6, log_every_n_steps=3, callbacks=[Steps()])
    trainer.fit(module, FixedBatches())
    terms = {f"train/{name}" for name in module.terms}
    assert [step for step, logs in logging.items() if logs] == [2, 5]
    for step, logs in logging.items():
        if logs:
            assert {"train/loss", "discrepancy/hidden", *terms} <= set(keys[step])
        else:
            assert keys[step] == ["train/loss"]
    assert terms <= set(trainer.callback_metrics)
