"""Distribution settings that Lightning's own strategies take: gradients all-reduced in bfloat16.

DDP all-reduces every gradient in float32 after each backward pass. Compressed to bfloat16 the bytes on the wire
halve; DDP casts the averaged result back into the float32 gradients, so the optimizer, its state and the
checkpoints are unchanged, and every rank still applies the identical update. It pays where the all-reduce is
not hidden behind the backward pass (several nodes, slow interconnects); on one NVLink node it is mostly hidden.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from typing_extensions import override

from lightning_kd.training.lightning_internals import ddp_comm_hook, register_ddp_comm_hook

COMPRESSIONS = {"bf16": default_hooks.bf16_compress_hook, "fp16": default_hooks.fp16_compress_hook}


class CompressedDDPStrategy(DDPStrategy):
    """``DDPStrategy`` that installs its communication hook on every device. Lightning installs one only on CUDA
    (NCCL once was the only backend that took hooks); gloo takes them too, so CPU runs test the same path."""

    @override
    def _register_ddp_hooks(self) -> None:
        if self.root_device.type == "cuda" or ddp_comm_hook(self) is None:
            return super()._register_ddp_hooks()
        register_ddp_comm_hook(self)
        return None


def compressed_ddp(compression: str = "bf16", **kwargs: Any) -> DDPStrategy:
    """Lightning's ``DDPStrategy`` with gradients all-reduced in ``bf16`` (or ``fp16``); ``kwargs`` go to it.

    ``Trainer(strategy=compressed_ddp())``; in a recipe, the same on GPUs without Python::

        strategy:
          class_path: lightning.pytorch.strategies.DDPStrategy
          init_args:
            ddp_comm_hook: torch.distributed.algorithms.ddp_comm_hooks.default_hooks.bf16_compress_hook
    """
    if compression not in COMPRESSIONS:
        raise ValueError(
            f"unknown gradient compression {compression!r}: use one of {', '.join(COMPRESSIONS)}."
        )
    return CompressedDDPStrategy(ddp_comm_hook=COMPRESSIONS[compression], **kwargs)
