"""Distillation on FSDP2 (PyTorch's ``fully_shard``) through Lightning's ``ModelParallelStrategy``.

``Trainer(strategy=fsdp2())`` shards the student of a :class:`~lightning_kd.DistillationModule` over every rank:
each transformer block (as its architecture adapter lists them) is one FSDP unit, and the rest of the student
(embeddings, heads, final norm) is the root unit. The teacher is frozen and stays outside the optimizer and the
checkpoint either way; ``teacher="sharded"`` shards it the same way (a teacher that does not fit one device),
``teacher="replicated"`` keeps a whole copy on every rank (no all-gathers for the teacher's forward: faster
when it fits). ``mixed_precision="bf16"`` computes in bfloat16 from float32 master weights and reduces
gradients in float32; ``activation_checkpointing=True`` recomputes each block's activations in backward.

Why ``ModelParallelStrategy`` and not ``FSDPStrategy``: Lightning's ``FSDPStrategy`` wraps with FSDP1
(``FullyShardedDataParallel``), which it refuses on CPU and which cannot be re-wrapped around parameters that
changed shape; ``ModelParallelStrategy`` leaves the sharding to the module's ``configure_model`` hook, where
``fully_shard`` is applied per block, and runs on CPU with gloo. It needs one adjustment, in
:class:`FSDP2Strategy`: by default it builds a 2-D mesh that puts every rank of a node on the tensor-parallel
axis; FSDP alone wants them all on the data-parallel axis.

Pruning events under FSDP2 (``PruningCallback``) gather the student to full tensors, cut it with the same
surgery as on one device, and shard it again (see :mod:`lightning_kd.training.sharded_surgery`).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from typing_extensions import override

from lightning_kd.models.info import has_adapter, masked_lm_parts
from lightning_kd.models.registry import get_adapter
from lightning_kd.training.lightning_internals import (
    attached_trainer,
    checkpoint_metadata_file,
    data_parallel_auto,
    run_root_hooks_around,
    shard_offset,
)

TEACHER_PLACEMENTS = ("sharded", "replicated")
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ShardPlan:
    """How a module's models are sharded, kept so that a pruning event can shard the shrunk student again."""

    mesh: Any  # the 1-D data-parallel DeviceMesh
    teacher: str = "sharded"
    mixed_precision: str | None = None
    activation_checkpointing: bool = False
    # the student's modules and shapes without their weights (on the meta device), to rebuild it whole
    skeleton: nn.Module | None = None
    hooks: list = field(default_factory=list)  # the student's (see shard_model)
    teacher_hooks: list = field(default_factory=list)

    def policy(self) -> MixedPrecisionPolicy:
        if self.mixed_precision is None:
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=PRECISIONS[self.mixed_precision], reduce_dtype=torch.float32)


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for FSDP2 alone: every rank on the data-parallel axis, and how to shard a
    :class:`~lightning_kd.DistillationModule` (see :func:`fsdp2`)."""

    def __init__(
        self,
        teacher: str = "sharded",
        mixed_precision: str | None = None,
        activation_checkpointing: bool = False,
        **kwargs: Any,
    ) -> None:
        if teacher not in TEACHER_PLACEMENTS:
            raise ValueError(
                f"unknown teacher placement {teacher!r}: use 'sharded' (split over the ranks, for a teacher that "
                "does not fit one device) or 'replicated' (a whole copy on every rank, faster when it fits)."
            )
        if mixed_precision is not None and mixed_precision not in PRECISIONS:
            raise ValueError(
                f"unknown mixed_precision {mixed_precision!r}: use one of {', '.join(PRECISIONS)}, or None "
                "to compute in float32."
            )
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(**kwargs)
        self.teacher_placement = teacher
        self.mixed_precision = mixed_precision
        self.activation_checkpointing = activation_checkpointing

    @override
    def setup_environment(self) -> None:
        # Lightning's own refusal names its configure_model hook, which a user of lightning-kd never writes
        if not hasattr(self.lightning_module, "student"):
            raise ValueError(
                f"fsdp2() shards a DistillationModule's student and teacher; {type(self.lightning_module).__name__} "
                "is not sharded by lightning-kd: train it with strategy='ddp' (fine-tuning a model that fits one "
                "device), or distil it into a smaller student with DistillationModule under fsdp2()."
            )
        data_parallel_auto(self)
        super().setup_environment()

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # A student shrunk during the run must have the checkpoint's shape before the shards load into it,
        # and the optimizer must hold the parameters of that shape (the student's shape is in the metadata).
        from lightning_kd.training.sharded_surgery import reshape_for_checkpoint  # it imports this module

        path = Path(self.broadcast(checkpoint_path))
        if reshape_for_checkpoint(self.lightning_module, checkpoint_metadata(path)):
            trainer = self.lightning_module.trainer
            if trainer.state.fn == TrainerFn.FITTING:
                self.setup_optimizers(trainer)
        return super().load_checkpoint(checkpoint_path, weights_only)


def checkpoint_metadata(path: Path) -> dict[str, Any]:
    """Everything but the weights and optimizer state of a checkpoint: the metadata file of a distributed
    checkpoint (a folder), or the whole file of a consolidated one."""
    return torch.load(
        checkpoint_metadata_file(path) if path.is_dir() else path, map_location="cpu", weights_only=False
    )


def fsdp2(
    teacher: str = "sharded",
    mixed_precision: str | None = None,
    activation_checkpointing: bool = False,
    **kwargs: Any,
) -> FSDP2Strategy:
    """The strategy for distilling (and pruning) on FSDP2: ``Trainer(strategy=fsdp2(), devices=N)``.

    Args:
        teacher: ``sharded`` (each rank holds 1/N of the teacher and gathers a block at a time for its forward)
            or ``replicated`` (each rank holds the whole teacher; no communication for its forward).
        mixed_precision: ``bf16`` or ``fp16``: the forward and backward run in that precision, the optimizer
            updates float32 master weights, and gradients are averaged in float32. ``None``: float32 throughout.
        activation_checkpointing: recompute each student block's activations in backward instead of keeping them.
        kwargs: go to Lightning's ``ModelParallelStrategy`` (``save_distributed_checkpoint``, ``timeout``).
    """
    return FSDP2Strategy(teacher, mixed_precision, activation_checkpointing, **kwargs)


def shard_plan(pl_module: L.LightningModule) -> ShardPlan | None:
    """The plan a module was sharded with, or None when it is not sharded."""
    return pl_module.__dict__.get("_shard_plan")


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def configure_sharding(pl_module: L.LightningModule) -> None:
    """Shard a DistillationModule's student (and its teacher, if asked) when the trainer's strategy is a
    ``ModelParallelStrategy``; do nothing under any other strategy. Called from ``configure_model``, which
    Lightning calls at every ``fit``/``validate``: a module sharded once is left as it is."""
    trainer = attached_trainer(pl_module)
    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, ModelParallelStrategy) or shard_plan(pl_module) is not None:
        return
    mesh = strategy.device_mesh
    if mesh.ndim > 1:
        if mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "lightning-kd shards with FSDP2 only (no tensor parallelism): use "
                "strategy=lightning_kd.training.fsdp2(), or ModelParallelStrategy(tensor_parallel_size=1)."
            )
        mesh = mesh["data_parallel"]
    if isinstance(strategy, FSDP2Strategy):
        plan = ShardPlan(
            mesh, strategy.teacher_placement, strategy.mixed_precision, strategy.activation_checkpointing
        )
    else:
        plan = ShardPlan(mesh)
    objective = getattr(pl_module, "objective", None)
    if objective is not None and any(p.requires_grad for p in objective.parameters()):
        # learned projections (a student of another width) would need their own sharding, and re-sharding
        # at every event that narrows them; not built yet, so refused rather than trained unsynchronised
        raise ValueError(
            "this objective learns projections between the student's and the teacher's widths, which "
            "lightning-kd does not shard yet: distil on FSDP2 with a student of the teacher's width (e.g. "
            "init 'copy' or 'layers'), or use DDP (strategy='ddp')."
        )
    student = pl_module.student
    if plan.activation_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plan.skeleton = meta_copy(student)
    plan.hooks = shard_model(student, plan, trainable=True)
    if plan.teacher == "sharded":
        teacher = pl_module.teacher
        if not is_sharded(teacher):
            plan.teacher_hooks = shard_model(teacher, plan, trainable=False)
    pl_module.__dict__["_shard_plan"] = plan


def shard_model(model: nn.Module, plan: ShardPlan, trainable: bool) -> list:
    """``fully_shard`` every block of ``model`` (as its adapter lists them), then the model itself as the root.

    Returns hook handles that let the root unit gather when the library calls the model's encoder and head
    one after the other (it does, to project to the vocabulary only where a loss reads) instead of the model.
    """
    policy = plan.policy()
    # FSDP2 keeps the root gathered from forward to the end of backward; a frozen teacher has no backward, so
    # every one of its units lets go of its gathered weights right after its forward
    reshard = None if trainable else True
    blocks = get_adapter(model).layers(model) if has_adapter(model) else []
    for block in blocks:
        fully_shard(block, mesh=plan.mesh, mp_policy=policy, reshard_after_forward=reshard)
    parts = masked_lm_parts(model) if has_adapter(model) else None
    fully_shard(model, mesh=plan.mesh, mp_policy=policy, reshard_after_forward=reshard)

    # FSDP2 keeps the root gathered after forward for the backward to come; a forward without gradients (the
    # teacher, or the student in validation) has none, so the root lets go right after, and gathers again
    # around the head, which the library calls after the body (and the next-token terms once per chunk)
    def without_backward() -> bool:
        return not trainable or not torch.is_grad_enabled()

    def let_go(*_: Any) -> None:
        if without_backward():
            model.reshard()

    def gather(*_: Any) -> None:
        if without_backward():
            model.unshard()

    hooks = [model.register_forward_hook(let_go)]
    if parts is not None:
        hooks += run_root_hooks_around(model, parts.encoder)
        hooks += [parts.encoder.register_forward_hook(let_go)]
        hooks += [parts.head.register_forward_pre_hook(gather), parts.head.register_forward_hook(let_go)]
    return hooks


def meta_copy(model: nn.Module) -> nn.Module:
    """``model``'s modules, config and shapes with every tensor on the meta device (no memory for weights)."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = (
            nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
        )
    return copy.deepcopy(model, memo)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole on every rank; any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_entry_sums(local: torch.Tensor, parameter: DTensor, dim: int) -> torch.Tensor:
    """``local`` (this rank's shard of a tensor shaped like ``parameter``) summed over every dim but ``dim``, at
    the full length along ``dim``: zeros where other ranks hold the entries, partial sums where the shard cuts
    across ``dim``. Summed over the ranks, it is what the whole tensor gives."""
    start = shard_offset(parameter, dim)
    sums = local.movedim(dim, 0).reshape(local.shape[dim], -1).sum(1)
    full = torch.zeros(parameter.shape[dim], dtype=sums.dtype, device=sums.device)
    full[start : start + sums.numel()] = sums
    return full


def sum_over_ranks(values: dict[str, torch.Tensor], sharded: list[DTensor]) -> None:
    """All-reduce (sum) ``values`` in place, in one call, over the ranks the tensors ``sharded`` are split across
    (nothing to do when there are none: the values are already whole)."""
    if not values or not sharded:
        return
    like = sharded[0]
    flat = torch.cat([value.reshape(-1) for value in values.values()])
    torch.distributed.all_reduce(flat, group=like.device_mesh.get_group())
    start = 0
    for value in values.values():
        value.copy_(flat[start : start + value.numel()].view_as(value))
        start += value.numel()
