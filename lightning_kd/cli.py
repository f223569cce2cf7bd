"""``lightning-kd fit --config recipe.yaml``: Lightning's CLI over any lightning-kd module and DataModule."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.cli import LightningCLI


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


def main(args: list[str] | None = None) -> None:
    # Tokenizers' own thread pool fights dataloader workers for the same cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    DistillationCLI(args=args)


if __name__ == "__main__":
    main()
