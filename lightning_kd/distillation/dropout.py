"""The student's dropout on a random stream of its own, which checkpoints carry.

Lightning does not checkpoint the global random state, and DataLoaders draw seeds from it whenever an epoch's
iterator is built, at points a resumed run does not reproduce. A stream that only the student's forward passes
advance makes a resumed run draw exactly the masks of one that never stopped. It starts from the global state
(so ``seed_everything`` fixes it), the same on every rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def random_stream(state: dict[str, Any] | None, device: torch.device) -> Iterator[dict[str, Any]]:
    """Run the block on the random stream ``state`` (``None``: from the global state) of ``device`` and the
    CPU, leaving the global streams as they were; yields a dict that holds the stream's state once the block
    ends (left empty when it raises)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    after: dict[str, Any] = {}
    with torch.random.fork_rng(devices=devices):
        if state is not None:
            torch.set_rng_state(state["cpu"])
            if devices:
                torch.cuda.set_rng_state(state["cuda"], device)
        yield after
        after.update(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if devices else None)
