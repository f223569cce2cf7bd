"""``lightning-kd fit --config recipe.yaml``: Lightning's CLI over any lightning-kd module and DataModule."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger

WANDB_SETTINGS = ("WANDB_PROJECT", "WANDB_API_KEY", "WANDB_MODE")


class DistillationCLI(LightningCLI):
    """LightningCLI with the model and data chosen by ``class_path`` in the recipe."""

    def __init__(self, **kwargs: object) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            **kwargs,
        )

    def before_fit(self) -> None:
        add_wandb_when_configured(self.trainer)


def add_wandb_when_configured(trainer: L.Trainer) -> None:
    """Log to W&B as well when the environment asks for it, so recipes need not name a W&B logger.

    ``WANDB_MODE=offline`` writes a run folder with no network; ``wandb sync`` uploads it later.
    """
    if not any(os.environ.get(name) for name in WANDB_SETTINGS):
        return
    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        return
    wandb = WandbLogger(
        project=os.environ.get("WANDB_PROJECT", "lightning-kd"), save_dir=trainer.default_root_dir
    )
    trainer.loggers = [*trainer.loggers, wandb]


def main(args: list[str] | None = None) -> None:
    # Tokenizers' own thread pool fights dataloader workers for the same cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    DistillationCLI(args=args)


if __name__ == "__main__":
    main()
