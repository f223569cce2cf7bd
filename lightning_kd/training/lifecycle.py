"""The lifecycle every lightning-kd LightningModule shares: train mode at fit start, and the callbacks it brings.

Every lightning-kd LightningModule starts training with the models it trains in train mode.

``from_pretrained`` returns a model in eval mode, and Lightning (2.2 on) keeps each submodule's mode as it
finds it at the start of fit, so a module that loads its model and does nothing would train with dropout off.
Modules call :func:`train_mode_for_fit` in ``on_fit_start`` (before the sanity check, whose mode Lightning
restores afterwards). Parts that must stay frozen say so themselves: the teacher lives outside the module tree,
and frozen submodules override ``train`` (the TED teacher filters).
"""

from __future__ import annotations

import lightning as L
from torch import nn

from lightning_kd.training.lightning_internals import attached_trainer


def train_mode_for_fit(module: nn.Module) -> None:
    module.train()


def modules_in_eval_mode(model: nn.Module) -> list[str]:
    """Names of the submodules of ``model`` in eval mode: what a test or a user checks at the start of training."""
    return [name for name, sub in model.named_modules() if not sub.training]


def default_callbacks(module: L.LightningModule) -> list[L.Callback]:
    """The callbacks every lightning-kd module brings (``configure_callbacks``): a :class:`NonFiniteGuard` with
    the ``stop`` policy, unless the Trainer already has one (Lightning would replace it by the module's)."""
    from lightning_kd.callbacks.nonfinite import NonFiniteGuard  # callbacks import the modules' helpers

    trainer = attached_trainer(module)
    if trainer is not None and any(isinstance(c, NonFiniteGuard) for c in trainer.callbacks):
        return []
    return [NonFiniteGuard()]
