"""Periodic checkpoints write the full state once: ``last.ckpt`` is a link to the newest file, not a second copy,
and a run resumes from it."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import yaml
from kd_helpers import FixedBatches, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import BertForMaskedLM

from lightning_kd import DistillationModule
from lightning_kd.training.checkpoints import AtomicCheckpointIO

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


class CountingIO(AtomicCheckpointIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def save_checkpoint(self, checkpoint: dict, path: str, storage_options: object = None) -> None:
        self.writes.append(Path(path).name)
        super().save_checkpoint(checkpoint, path, storage_options)


class StartStep(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step = trainer.global_step


def test_save_last_link_writes_each_state_once_and_resumes(teacher: BertForMaskedLM, tmp_path: Path) -> None:
    io = CountingIO()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last="link")
    module = DistillationModule(teacher, {"init": "layers", "num_layers": 2}, task="masked-lm")
    trainer = quiet_trainer(max_steps=4, enable_checkpointing=True, callbacks=[checkpoints], plugins=[io])
    trainer.fit(module, datamodule=FixedBatches())
    assert io.writes == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]  # no full last.ckpt beside them
    last = tmp_path / "last.ckpt"
    assert last.is_symlink() and last.resolve() == (tmp_path / "epoch=0-step=4.ckpt").resolve()

    # `--ckpt_path last` hands Lightning the word: it finds the link in the ModelCheckpoint's folder and loads
    # the file it points to
    resumed = DistillationModule(teacher, {"init": "layers", "num_layers": 2}, task="masked-lm")
    start = StartStep()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last="link")
    trainer = quiet_trainer(max_steps=5, enable_checkpointing=True, callbacks=[checkpoints, start])
    trainer.fit(resumed, datamodule=FixedBatches(), ckpt_path="last")
    assert start.step == 4 and trainer.global_step == 5
    assert trainer.ckpt_path == str(last)
    saved = torch.load(last, weights_only=False)["state_dict"]
    assert saved.keys() == module.state_dict().keys()


def test_paper_recipes_with_periodic_checkpoints_link_the_last_one() -> None:
    periodic = 0
    for recipe in sorted(EXPERIMENTS.rglob("*.yaml")):
        config = yaml.safe_load(recipe.read_text()) or {}
        for callback in (config.get("trainer") or {}).get("callbacks") or []:
            args = callback.get("init_args") or {}
            if callback.get("class_path", "").endswith("ModelCheckpoint") and args.get("every_n_train_steps"):
                periodic += 1
                assert args.get("save_last") == "link", (
                    f"{recipe.name} writes last.ckpt as a second full copy"
                )
    assert periodic >= 4  # the four HomoBERT recipes
