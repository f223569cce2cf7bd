"""Callbacks the SLURM test jobs load by ``class_path`` (the jobs put tests/slurm on PYTHONPATH).

``RankRecord`` makes every rank leave evidence the test can compare: where it ran, which attempt of the
job it was and from which step that attempt started, its pruning masks and its final student. ``HoldAt``
stops every rank at the same step of an attempt, so that a signal sent by the test finds all ranks in the
same place.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_kd import PruningCallback


def _attempt() -> int:
    """0 for a job's first run, n after its n-th requeue."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0"))


def _address_towards(host: str) -> str:
    """The local address this process uses to reach ``host``: which end of the link a rank sits on."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))  # UDP connect sends nothing; it only picks the route
        return probe.getsockname()[0]


def _pruning(trainer: L.Trainer) -> PruningCallback:
    (pruning,) = [cb for cb in trainer.callbacks if isinstance(cb, PruningCallback)]
    return pruning


class RankRecord(L.Callback):
    """Writes ``start-rank<r>-attempt<n>.json`` (the step an attempt starts from), ``progress-rank<r>.json``
    after every step and ``rank<r>-attempt<n>.pt`` at the end of fit.

    Put it after the PruningCallback: its ``on_train_end`` must see the physically pruned student.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def _where(self, trainer: L.Trainer) -> dict[str, Any]:
        master = os.environ.get("MASTER_ADDR", "127.0.0.1")
        return {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "node": os.environ.get("SLURMD_NODENAME"),
            "job": os.environ.get("SLURM_JOB_ID"),
            "attempt": _attempt(),
            "address": _address_towards(master),
            "master": master,
            "cluster_environment": type(trainer._accelerator_connector.cluster_environment).__name__,
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        }

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        start = {"step": trainer.global_step, **self._where(trainer)}
        (self.out_dir / f"start-rank{trainer.global_rank}-attempt{_attempt()}.json").write_text(
            json.dumps(start)
        )

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        progress = {"step": trainer.global_step, **self._where(trainer)}
        path = self.out_dir / f"progress-rank{trainer.global_rank}.json"
        # written whole and renamed, so the polling test never reads half a file
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(progress))
        tmp.replace(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pruning = _pruning(trainer)
        record = {
            **self._where(trainer),
            "global_step": trainer.global_step,
            "events": list(pruning.events),
            "masks": {kind: mask.clone() for kind, mask in pruning.masks.items()},
            "student": {
                name: value.detach().clone() for name, value in pl_module.student.state_dict().items()
            },
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(record, self.out_dir / f"rank{trainer.global_rank}-attempt{_attempt()}.pt")


class Pace(L.Callback):
    """Makes each step of the job's first attempt last ``seconds`` longer, so that a signal the test sends lands
    in the middle of the run (each rank sleeps on its own: one may already be in the next step's gradient
    all-reduce). Later attempts run at full speed: nothing is sent to them mid-step (``HoldAt`` places the kill).
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if _attempt() == 0:
            time.sleep(self.seconds)


class HoldAt(L.Callback):
    """Keeps every rank in ``on_train_batch_end`` of step ``steps[n]`` on the job's attempt ``n``, for ``seconds``
    (a negative step holds nowhere). Each rank writes ``held-rank<r>-attempt<n>`` once it holds, so the test
    knows where the job is when it kills it.
    """

    def __init__(self, steps: list[int], out_dir: str, seconds: float = 120.0) -> None:
        self.steps, self.out_dir, self.seconds = list(steps), Path(out_dir), seconds

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        attempt = _attempt()
        if attempt >= len(self.steps) or trainer.global_step != self.steps[attempt]:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"held-rank{trainer.global_rank}-attempt{attempt}").write_text(
            str(trainer.global_step)
        )
        deadline = time.monotonic() + self.seconds
        # Sleeping in Python lets signal handlers run at once; SLURM's SIGKILL ends the hold.
        while time.monotonic() < deadline:
            time.sleep(0.05)
