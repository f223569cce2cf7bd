"""Writes the same checkpoint path over and over until killed: the harness for the kill-while-writing test."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lightning_kd.training.checkpoints import AtomicCheckpointIO

SIZE = 4_000_000  # 16 MB: long enough to be caught half-written, short enough to write often


def main(path: Path, mode: str) -> None:
    writer = AtomicCheckpointIO()
    for index in range(10_000):
        # big enough that a write takes long enough to be caught in the middle
        checkpoint = {"index": index, "payload": torch.full((SIZE,), float(index))}
        if mode == "atomic":
            writer.save_checkpoint(checkpoint, path)
        else:
            torch.save(checkpoint, path)  # what a writer without the rename would do


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
