"""What a CLI run records about itself: the whole resolved recipe in every logger, and a readable run name.

LightningCLI writes ``config.yaml`` next to the first logger's files; the loggers themselves only see the model's
arguments (its ``save_hyperparameters``). :class:`RecipeConfigCallback` gives every logger (W&B's run config,
CSVLogger's ``hparams.yaml``) the trainer, model, data and callbacks as the run resolved them, and names W&B runs
after their recipe (``ted-tiny_stage2`` for ``experiments/ted/tiny_stage2.yaml``) instead of a random name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from lightning_kd.training.lightning_internals import wandb_init_kwargs, wandb_run_started


def recipe_run_name(config_files: Sequence[str | os.PathLike]) -> str | None:
    """``<folder>-<stem>`` of the last recipe file (``experiments/ted/tiny_stage2.yaml`` -> ``ted-tiny_stage2``);
    the stem alone for a recipe directly in ``experiments/`` or elsewhere at the top."""
    if not config_files:
        return None
    path = Path(str(config_files[-1]))
    parent = path.parent.name
    return path.stem if parent in ("", ".", "experiments") else f"{parent}-{path.stem}"


class RecipeConfigCallback(SaveConfigCallback):
    """LightningCLI's config saving, plus the resolved configuration in every logger and a run name."""

    @override
    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config: dict[str, Any] = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        files = [str(f) for f in (self.config.get("config") or []) if f is not None]
        config.pop("config", None)
        name = recipe_run_name(files)
        if files:
            pl_module.recipe = files[-1]  # the model card names the recipe its model came from
        for logger in trainer.loggers:
            logger.log_hyperparams({"run": {"name": name, "recipe": files}, **config})


def name_wandb_runs(trainer: L.Trainer, config_files: Sequence[str | os.PathLike]) -> None:
    """Name the W&B runs that the recipe left unnamed after the recipe. Called before fit: Lightning creates the
    runs when setup starts, and a run's name is chosen when it is created."""
    name = recipe_run_name(config_files)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and name and not wandb_run_started(logger):
            settings = wandb_init_kwargs(logger)
            if not settings.get("name"):
                settings["name"] = name


def finish_wandb_runs(trainer: L.Trainer) -> None:
    """End the run's W&B runs when the command returns. An offline run's folder gets ``files/config.yaml`` and
    ``files/wandb-summary.json`` as an online run's has them (wandb's offline mode keeps both only inside its
    binary ``.wandb`` file), so tools that read run folders find them."""
    for logger in trainer.loggers:
        if not isinstance(logger, WandbLogger) or not wandb_run_started(logger):
            continue
        run = logger.experiment
        if (
            getattr(getattr(run, "settings", None), "mode", None) == "offline"
            or os.environ.get("WANDB_MODE") == "offline"
        ):
            files = Path(run.dir)
            files.mkdir(parents=True, exist_ok=True)
            config = {key: {"value": value} for key, value in run.config.as_dict().items()}
            (files / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            summary = {key: value for key, value in dict(run.summary).items() if _is_json(value)}
            (files / "wandb-summary.json").write_text(json.dumps(summary))
        run.finish()


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
