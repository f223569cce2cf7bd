"""Records, on the CPU, the operations that make a GPU host wait for the device, by step of a Lightning run.

On a CPU nothing waits, so the test looks at what the code asks for instead: reading a value on the host
(``.item()``, ``float(t)``, ``bool(t)``: ``aten._local_scalar_dense``), outputs whose shape depends on values
(``nonzero``, ``masked_select``, boolean-mask indexing, ``unique``), and tensors made from Python data
(``torch.tensor(x)``: ``aten.lift_fresh``, a blocking host-to-device copy when the device is a GPU).
"""

from __future__ import annotations

import traceback
from typing import Any

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
ALWAYS = {
    aten._local_scalar_dense,
    aten.nonzero,
    aten.masked_select,
    aten.is_nonzero,
    aten.equal,
    aten.unique_dim,
    aten._unique2,
    aten.unique_consecutive,
    aten.lift_fresh,
}
WITH_BOOL_INDEX = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class SyncRecorder(TorchDispatchMode, L.Callback):
    """A dispatch mode and a callback: each recorded operation is filed under the step it ran in, from one
    ``on_train_batch_start`` to the next (so everything Lightning and the callbacks do after a step counts),
    with whether that step logs. Paused while ``paused`` is set (code whose syncs are allowed)."""

    def __init__(self) -> None:
        TorchDispatchMode.__init__(self)
        self.step: int | None = None
        self.logging = False
        self.paused = 0
        self.host: set[int] = set()  # data pointers of tensors that stay on the host on a GPU as well
        self.found: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.step = trainer.global_step
        self.logging = trainer._logger_connector.should_update_logs
        # AdamW keeps its step counters on the host unless capturable or fused: reading them waits for nothing
        self.host = {
            state["step"].data_ptr()
            for optimizer in trainer.optimizers
            for state in optimizer.state.values()
            if isinstance(state.get("step"), torch.Tensor)
        }

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        packet = func.overloadpacket
        if (
            self.step is not None
            and not self.paused
            and (packet in ALWAYS or (packet in WITH_BOOL_INDEX and _bool_index(args)))
        ):
            on_host = (
                packet is aten._local_scalar_dense
                and isinstance(args[0], torch.Tensor)
                and args[0].data_ptr() in self.host
            )
            if not on_host:
                where = [
                    f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}"
                    for f in traceback.extract_stack()[-24:-2]
                ]
                self.found.append(
                    {"step": self.step, "logging": self.logging, "op": str(func), "where": where}
                )
        return func(*args, **(kwargs or {}))

    def between_logging_steps(self, after: int = 0) -> list[dict[str, Any]]:
        return [f for f in self.found if not f["logging"] and f["step"] >= after]


class Paused:
    """``with Paused(recorder):`` records nothing inside (nests)."""

    def __init__(self, recorder: SyncRecorder) -> None:
        self.recorder = recorder

    def __enter__(self) -> None:
        self.recorder.paused += 1

    def __exit__(self, *exc: object) -> None:
        self.recorder.paused -= 1
