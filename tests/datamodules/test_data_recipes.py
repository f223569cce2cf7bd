"""The GLUE recipes parse and name real classes; the offline docstrings recipe runs through LightningCLI."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_kd.datamodules import GLUEDataModule
from lightning_kd.datamodules.docstrings import DOCSTRING_CLASSES, write_docstring_task

RECIPES = Path(__file__).resolve().parents[2] / "experiments" / "glue"
# Recipes name the top-level exports; these are the classes behind them.
DEFINED_IN = {
    "lightning_kd.FineTuningModule": "lightning_kd.finetuning.module.FineTuningModule",
    "lightning_kd.GLUEDataModule": "lightning_kd.datamodules.GLUEDataModule",
}


def load(path: Path) -> dict:
    config = yaml.safe_load(path.read_text())
    for part in ("model", "data"):
        config[part]["class_path"] = DEFINED_IN[config[part]["class_path"]]
    return config


def test_every_glue_task_has_a_recipe():
    names = {p.stem for p in RECIPES.glob("bert_base_*.yaml")}
    assert names == {
        f"bert_base_{t}" for t in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
    }
    for path in RECIPES.glob("*.yaml"):
        config = load(path)
        assert config["model"]["init_args"]["task"] == config["data"]["init_args"]["task"]


def test_docstrings_task_is_shaped_like_glue(tmp_path):
    folder = write_docstring_task(tmp_path / "task")
    dm = GLUEDataModule("docstrings", "sentence-transformers/all-MiniLM-L6-v2", data_dir=str(folder))
    dm.setup("fit")
    assert dm.num_labels == len(DOCSTRING_CLASSES) == 6 and not dm.is_regression
    assert len(dm.datasets["train"]) > 400 and len(dm.datasets["validation"]) > 80
    labels = {row["labels"] for row in dm.datasets["train"]}
    assert labels == set(range(6))


@pytest.mark.slow
def test_offline_recipe_fits_and_validates(tmp_path):
    config = load(RECIPES / "docstrings_minilm_tiny.yaml")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=[
            "fit",
            "--config",
            str(path),
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ],
        save_config_kwargs={"overwrite": True},
    )
    assert "val/docstrings/accuracy" in cli.trainer.callback_metrics
