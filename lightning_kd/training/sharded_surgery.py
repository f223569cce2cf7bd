"""Changing the shape of a student that FSDP2 shards: gather it whole, cut it, shard it again.

FSDP2 cannot re-shard parameters that changed shape, and the surgery (``lightning_kd/pruning/prune.py``) slices
whole matrices. So at a pruning event, on every rank at once: every parameter and its AdamW moments are gathered
to full tensors, a plain student is rebuilt around them from the meta-device skeleton kept when the student was
first sharded, the surgery cuts it and re-indexes the moments exactly as on one device, and the shrunk student
is sharded again with the same plan, its moments split the way the new parameters are. The optimizer keeps its
step count and settings; only its parameters and their state change.

While the student is whole, each rank holds all of it (as under DDP) for the length of the event: the peak
memory of an event is DDP's, between events it is FSDP2's. Every rank gathers the same tensors in the same
order and takes rank 0's masks, so the ranks stay bit-identical.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from lightning_kd.pruning.shrink import move_optimizer_state_, rebuild_shape_, student_shape
from lightning_kd.training.sharding import full_tensor, is_sharded, meta_copy, shard_model, shard_plan


def reshape_for_checkpoint(pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> bool:
    """Shrink a sharded student to the shape ``checkpoint`` recorded (``lightning_kd.student_shape``, written by
    every DistillationModule checkpoint) before its shards load; True when the shape changed, so that the caller
    builds the optimizer again around the new parameters."""
    shape = checkpoint.get("lightning_kd", {}).get("student_shape")
    if shape is None or shard_plan(pl_module) is None or not is_sharded(pl_module.student):
        return False
    if student_shape(pl_module.student) == {
        k: (int(v) if k == "hidden" else list(v)) for k, v in shape.items()
    }:
        return False
    with whole_student(None, pl_module):
        kept = rebuild_shape_(pl_module.student, shape)
        if kept is not None:
            pl_module.objective.follow_student_width(kept, pl_module.student)
    return True


@contextmanager
def whole_student(trainer: L.Trainer | None, pl_module: L.LightningModule) -> Iterator[None]:
    """Inside, ``pl_module.student`` is a plain (unsharded) model and the optimizers hold its parameters with
    whole moments; on leaving, whatever the student became is sharded again and the optimizers follow. Under any
    other strategy it does nothing."""
    plan = shard_plan(pl_module)
    if plan is None or not is_sharded(pl_module.student):
        yield
        return
    optimizers = list(trainer.optimizers) if trainer is not None else []
    pl_module.student = gather_student(pl_module, optimizers)
    yield
    reshard_student(pl_module, optimizers)


@contextmanager
def student_for_export(pl_module: L.LightningModule) -> Iterator[None]:
    """Inside, on rank 0, ``pl_module.student`` is the whole student as a plain model on the CPU, ready to write
    as a transformers folder; afterwards the sharded student is back. Every rank must enter (the gather is a
    collective); only rank 0 receives the weights, so no other rank ever holds the whole student. Under any
    other strategy it does nothing."""
    plan = shard_plan(pl_module)
    if plan is None or not is_sharded(pl_module.student):
        yield
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sharded = pl_module.student
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(sharded, options=options)
    if torch.distributed.get_rank() != 0:
        yield
        return
    buffers = {name: buffer.cpu() for name, buffer in sharded.named_buffers()}
    pl_module.student = _materialize(plan.skeleton, full, buffers)
    try:
        yield
    finally:
        pl_module.student = sharded


def gather_student(pl_module: L.LightningModule, optimizers: list[torch.optim.Optimizer]) -> nn.Module:
    """The sharded student as a plain model on every rank (a collective: every rank must call it), with the
    optimizers pointed at its parameters and their state gathered whole."""
    plan = shard_plan(pl_module)
    sharded = pl_module.student
    names = {id(p): n for n, p in sharded.named_parameters()}
    full = {n: full_tensor(p.detach()) for n, p in sharded.named_parameters()}
    student = _materialize(plan.skeleton, full, dict(sharded.named_buffers()))
    plain = dict(student.named_parameters())
    for optimizer in optimizers:
        move_optimizer_state_(
            optimizer,
            {key: plain[name] for key, name in names.items()},
            lambda value, old, new: full_tensor(value),
        )
    for handle in plan.hooks:
        handle.remove()
    plan.hooks = []
    return student


def reshard_student(pl_module: L.LightningModule, optimizers: list[torch.optim.Optimizer]) -> None:
    """Shard the plain ``pl_module.student`` again with its plan; the optimizers follow, their state split as the
    new parameters are."""
    plan = shard_plan(pl_module)
    student = pl_module.student
    plan.skeleton = meta_copy(student)
    names = {id(p): n for n, p in student.named_parameters()}
    plan.hooks = shard_model(student, plan, trainable=True)
    sharded = dict(student.named_parameters())
    swaps = {key: sharded[name] for key, name in names.items()}
    for optimizer in optimizers:
        move_optimizer_state_(optimizer, swaps, lambda value, old, new: _split_like(value, new))


def _materialize(
    skeleton: nn.Module, full: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]
) -> nn.Module:
    """A copy of the meta-device ``skeleton`` holding the tensors ``full`` (by parameter name) and ``buffers``;
    parameters tied in the skeleton (one object under two names) stay tied."""
    model = copy.deepcopy(skeleton)
    canonical: dict[int, str] = {}
    for name, parameter in model.named_parameters():
        canonical.setdefault(id(parameter), name)
    buffer_names: dict[int, str] = {}
    for name, buffer in model.named_buffers():
        buffer_names.setdefault(id(buffer), name)
    made: dict[str, nn.Parameter] = {}
    for module in model.modules():
        for key, parameter in module._parameters.items():
            if parameter is not None:
                name = canonical[id(parameter)]
                if name not in made:
                    made[name] = nn.Parameter(full[name], requires_grad=parameter.requires_grad)
                module._parameters[key] = made[name]
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = buffers[buffer_names[id(buffer)]]
    return model


def _split_like(value: torch.Tensor, parameter: nn.Parameter) -> torch.Tensor:
    """A whole tensor (the same on every rank) split the way the sharded ``parameter`` is: each rank keeps its
    slice, no communication."""
    if not isinstance(parameter, DTensor):
        return value
    return distribute_tensor(value, parameter.device_mesh, parameter.placements, src_data_rank=None)
