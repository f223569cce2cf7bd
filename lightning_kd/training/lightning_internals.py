"""Every use of Lightning's (and torch's) private API in lightning-kd, in one place.

Lightning has no public way to ask some things a distillation run needs every step: whether this step's metrics
reach the loggers (so the discrepancy is computed only then), whether a batch is a micro-batch of gradient
accumulation, which cluster environment the Trainer detected, the trainer a module is attached to without the
error ``module.trainer`` raises when it is not. Each answer below reads a private attribute; nothing else in the
library does. ``tests/training/test_lightning_internals.py`` checks each one against the installed Lightning on
a real Trainer, so an upgrade that moves one fails there, by name, instead of deep inside a run.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import ClusterEnvironment

# (object, attribute path) pairs this module relies on, for the test and for the error below
RELIED_ON = (
    ("Trainer", "_logger_connector.should_update_logs"),
    ("Trainer", "fit_loop._should_accumulate"),
    ("Trainer", "_accelerator_connector.cluster_environment"),
    ("LightningModule", "_trainer"),
    ("WandbLogger", "_wandb_init"),
    ("WandbLogger", "_experiment"),
    ("CSVLogger", "_version"),
    ("Trainer", "_checkpoint_connector._parse_ckpt_path"),
    ("DDPStrategy", "_register_ddp_hooks"),
    ("GradScaler", "_found_inf_per_device"),
    ("Trainer", "validate_loop._data_source"),
    ("Trainer", "test_loop._data_source"),
    ("Trainer", "predict_loop._data_source"),
    ("ModelParallelStrategy", "_data_parallel_size"),
    ("ModelParallelStrategy", "_tensor_parallel_size"),
    ("FSDPState", "_pre_forward"),
    ("FSDPState", "_post_forward"),
    ("FSDPState", "_training_state"),
)


def _read(owner: Any, path: str) -> Any:
    value = owner
    for name in path.split("."):
        try:
            value = getattr(value, name)
        except AttributeError as error:
            raise RuntimeError(
                f"lightning-kd reads {type(owner).__name__}.{path}, which this version of Lightning or torch does not "
                "have; install the versions in setup.cfg, or report it with `pip show lightning torch`."
            ) from error
    return value


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The Trainer ``module`` is attached to, or None (``module.trainer`` raises when there is none)."""
    return getattr(module, "_trainer", None)


def logs_this_step(trainer: L.Trainer) -> bool:
    """Whether the metrics logged in this training step reach the loggers (``log_every_n_steps``)."""
    return bool(_read(trainer, "_logger_connector.should_update_logs"))


def accumulating(trainer: L.Trainer) -> bool:
    """Whether the current batch is a micro-batch whose optimizer step has not happened yet."""
    return bool(_read(trainer, "fit_loop._should_accumulate")())


def cluster_environment(trainer: L.Trainer) -> ClusterEnvironment:
    """The cluster environment the Trainer detected (SLURM, torchelastic, a plain machine)."""
    return _read(trainer, "_accelerator_connector.cluster_environment")


def wandb_run_started(logger: Any) -> bool:
    """Whether a WandbLogger has created its run yet (its name can only be chosen before)."""
    return getattr(logger, "_experiment", None) is not None


def wandb_init_kwargs(logger: Any) -> dict[str, Any]:
    """The keyword arguments a WandbLogger will pass to ``wandb.init`` (mutable until the run starts)."""
    return _read(logger, "_wandb_init")


def pin_csv_version(logger: Any, version: int | str) -> None:
    """Make a CSVLogger write to its folder ``version`` (the constructor's ``version``, after construction)."""
    _read(logger, "_version")
    logger._version = version


def resolve_fit_ckpt_path(trainer: L.Trainer, ckpt_path: Any) -> str | None:
    """The checkpoint file ``trainer.fit(ckpt_path=...)`` will resume from, resolved as Lightning resolves it
    (``last``, ``hpc``, and under SLURM a requeued job's checkpoint when none is given), or None."""
    from lightning.pytorch.trainer.states import TrainerFn

    parse = _read(trainer, "_checkpoint_connector._parse_ckpt_path")
    path = parse(TrainerFn.FITTING, ckpt_path, model_provided=True, model_connected=False)
    return None if path is None else str(path)


def register_ddp_comm_hook(strategy: Any) -> None:
    """Install a DDPStrategy's communication hook on any device (Lightning installs it on CUDA only)."""
    from lightning.pytorch.strategies.ddp import _register_ddp_comm_hook

    _register_ddp_comm_hook(
        model=strategy.model,
        ddp_comm_state=strategy._ddp_comm_state,
        ddp_comm_hook=strategy._ddp_comm_hook,
        ddp_comm_wrapper=strategy._ddp_comm_wrapper,
    )


def ddp_comm_hook(strategy: Any) -> Any:
    """The communication hook a DDPStrategy was given, or None."""
    return getattr(strategy, "_ddp_comm_hook", None)


def overflowed_per_device(scaler: Any, optimizer: Any) -> dict[Any, Any]:
    """A GradScaler's found-inf flags for ``optimizer`` (filled by ``unscale_``), device -> tensor."""
    return _read(scaler, "_found_inf_per_device")(optimizer)


def dataloader_source(trainer: L.Trainer, stage: str) -> Any:
    """Where ``validate``, ``test`` or ``predict`` takes its loaders from (the DataModule, the module, or loaders
    passed to the Trainer): ``is_defined()`` says whether there are any, ``dataloader()`` builds them."""
    return _read(trainer, f"{stage}_loop._data_source")


def data_parallel_auto(strategy: Any) -> None:
    """Put every rank of a ``ModelParallelStrategy`` left on "auto" on the data-parallel axis (Lightning's "auto"
    puts one per node there and the node's devices on the tensor-parallel axis); call before its
    ``setup_environment``."""
    if strategy._data_parallel_size == "auto":
        tensor = 1 if strategy._tensor_parallel_size == "auto" else int(strategy._tensor_parallel_size)
        strategy._data_parallel_size = strategy.num_nodes * strategy.num_processes // tensor


def checkpoint_metadata_file(folder: Any) -> Any:
    """The file of a distributed (folder) checkpoint that holds everything but the weights and optimizer state."""
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    return folder / _METADATA_FILENAME


def shard_offset(tensor: Any, dim: int) -> int:
    """Where this rank's shard of a DTensor starts along ``dim`` in the whole tensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return offset[dim]


def run_root_hooks_around(model: Any, module: Any) -> list:
    """Run the FSDP2 root unit ``model``'s forward hooks around ``module`` when ``module`` is called on its own
    (not from ``model``'s forward, where FSDP2 runs them itself); returns the hook handles.

    FSDP2 gathers a unit's parameters in the pre-hook of the module it was applied to, and the first unit to run
    forward becomes the root. When a model is run part by part (its encoder, then its head), its own hooks never
    fire: these run them around the first part instead, and the root keeps its parameters gathered after
    forward (FSDP2's default for the root) for the parts that follow.
    """
    state = model._get_fsdp_state()
    driving: list[bool] = []

    def before(_module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if state._training_state.name == "FORWARD":  # inside the model's own forward
            return None
        driving.append(True)
        return state._pre_forward(model, args, kwargs)

    def after(_module: Any, args: tuple, output: Any) -> Any:
        if not driving:
            return None
        driving.pop()
        return state._post_forward(model, args, output)

    return [module.register_forward_pre_hook(before, with_kwargs=True), module.register_forward_hook(after)]
