"""Checkpoints that survive being killed while they are written.

Lightning's default writer serialises the checkpoint into memory and hands it to fsspec, whose local
"transaction" writes a temporary file in the system temp folder and then moves it into place. When the temp
folder and the checkpoint folder are different file systems (a node-local ``/tmp`` and a shared cluster file
system, the usual case under SLURM), that move is a copy, and a job killed during the copy leaves a truncated
``last.ckpt`` that the next ``--ckpt_path last`` picks. Nothing is flushed to disk either, so a node crash can
leave an empty file.

:class:`AtomicCheckpointIO` writes next to the target, under a name no checkpoint search matches, flushes and
fsyncs it, and renames it over the target: the rename is atomic on a POSIX file system, so the target is
always either the previous complete checkpoint or the new complete one. ``lightning-kd fit`` installs it;
with a plain ``Trainer`` pass ``plugins=[AtomicCheckpointIO()]``.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

PARTIAL = ".partial"


def partial_path(path: _PATH) -> Path:
    """Where ``path`` is written before it is renamed into place: hidden, and not ending in ``.ckpt``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{PARTIAL}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic and durable (write aside, fsync, rename).

    Remote paths (``s3://`` and the like) keep Lightning's writer: object stores publish an object only once
    it is complete.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = partial_path(target)
        try:
            with open(staging, "wb") as handle:
                # Straight to the file: no second in-memory copy of a multi-GB checkpoint.
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(staging, target)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
        _fsync_directory(target.parent)
        # What writers killed earlier left for this target is never a complete checkpoint, only wasted disk.
        for stale in target.parent.glob(f".{glob.escape(target.name)}.*{PARTIAL}"):
            stale.unlink(missing_ok=True)


def _is_local(path: _PATH) -> bool:
    return type(get_filesystem(path)).__name__ == "LocalFileSystem"


def _fsync_directory(folder: Path) -> None:
    # The rename itself lives in the directory entry; without this a power loss can forget it.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def install_atomic_checkpoints(trainer: Any) -> None:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` unless the user chose a checkpoint writer of their own."""
    strategy = trainer.strategy
    current = getattr(strategy, "_checkpoint_io", None)
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
