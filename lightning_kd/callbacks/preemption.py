"""PreemptionCheckpoint: on SLURM's warning signal, every rank checkpoints at the same step, then the job requeues.

SLURM warns a job before its time limit or a preemption with a signal (``#SBATCH --signal=USR1@90``). Lightning's
own auto-requeue saves the checkpoint inside the signal handler, wherever each rank happens to be when the
signal lands. Under DDP the save has collectives, and a rank blocked in another collective (the gradient
all-reduce) cannot join them, so the job can hang until it is killed, with no checkpoint. On the test cluster
that happened in 2 of 3 trials (Lightning issue #21406).

This callback only records the signal in the handler. After every ``check_every`` optimizer steps the ranks
agree (one small all-reduce) whether any of them was signalled; if so, all of them save the checkpoint together
at that step boundary, rank 0 requeues the job with ``scontrol requeue``, and training stops. The checkpoint is
``<default_root_dir>/hpc_ckpt_<n>.ckpt``, where Lightning (and the scripts in ``experiments/slurm``) look for it
when the requeued job starts. It turns Lightning's own handler off.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_kd.pruning.callback import PruningCallback
from lightning_kd.training.lightning_internals import accumulating, cluster_environment


class PreemptionCheckpoint(L.Callback):
    """Checkpoint on ``signal_name`` at a step boundary all ranks agree on, then requeue the SLURM job.

    Args:
        signal_name: the warning signal, as ``--signal`` sends it (``SIGUSR1`` by default).
        check_every: optimizer steps between the ranks' checks of the flag (each check is one all-reduce of a
            scalar and a device sync, so not every step on a GPU); the warning comes long before the kill.
        requeue: run ``scontrol requeue`` (rank 0, under SLURM) after the checkpoint is written.

    ``lightning-kd fit`` adds one when it runs under SLURM; with a plain ``Trainer``, add it yourself.
    """

    def __init__(self, signal_name: str = "SIGUSR1", check_every: int = 10, requeue: bool = True) -> None:
        try:
            self.signum = signal.Signals[signal_name]
        except KeyError:
            raise ValueError(
                f"unknown signal {signal_name!r}: use a name such as 'SIGUSR1' or 'SIGTERM'."
            ) from None
        if check_every < 1:
            raise ValueError(f"check_every must be at least 1 step, got {check_every}.")
        self.check_every = check_every
        self.requeue = requeue
        self.signalled = False
        self.saved: str | None = None
        self._previous: Any = None
        self._installed = False

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        later = trainer.callbacks[trainer.callbacks.index(self) + 1 :]
        if any(isinstance(callback, PruningCallback) for callback in later):
            raise ValueError(
                "PreemptionCheckpoint comes before a PruningCallback in trainer.callbacks, so its checkpoint would "
                "miss a pruning event of the same step and the resumed run would skip it. List it after the "
                "PruningCallback (lightning-kd fit places it last)."
            )
        environment = cluster_environment(trainer)
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            # One handler for the signal, and the one that does not deadlock: Lightning's registers at fit start
            # only when this is on.
            environment.auto_requeue = False
        if stage != "fit":
            return
        # Installed before any DataLoader worker is forked: SLURM signals every process of the step, and a worker
        # with the default action for SIGUSR1 would die of it. A worker inherits this handler and only sets a
        # flag in its own copy.
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn(
                "PreemptionCheckpoint needs the main thread to install its signal handler; it is off."
            )
            return
        self.signalled = False
        if not self._installed:
            self._previous = signal.signal(self.signum, self._handle)
            self._installed = True

    def _handle(self, signum: int, frame: Any) -> None:
        # Only a flag: the handler runs between two Python bytecodes of whatever this rank is doing.
        self.signalled = True
        if callable(self._previous) and self._previous not in (signal.SIG_IGN, signal.SIG_DFL):
            self._previous(signum, frame)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self._installed or trainer.global_step % self.check_every or accumulating(trainer):
            return
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        path = next_hpc_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)  # every rank is here, at the same step: the save's collectives line up
        self.saved = path
        rank_zero_info(
            f"{self.signum.name} received: checkpoint of step {trainer.global_step} saved to {path}"
        )
        if self.requeue and trainer.is_global_zero:
            requeue_slurm_job()
        trainer.should_stop = True

    def _restore(self) -> None:
        if self._installed:
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()


def next_hpc_path(folder: str | os.PathLike) -> str:
    """``hpc_ckpt_<n>.ckpt`` in ``folder``, one above the highest there: the name Lightning resumes from."""
    numbers = [
        int(m.group(1))
        for p in Path(folder).glob("hpc_ckpt_*.ckpt")
        if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))
    ]
    return str(Path(folder) / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt")


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this job (or array task); False, with a warning, when that is not possible."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID")
    if not job:
        rank_zero_warn("not a SLURM job (no SLURM_JOB_ID): checkpoint saved, nothing requeued.")
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        rank_zero_warn(
            f"could not requeue SLURM job {job}: {error}. Resubmit it; it resumes from the checkpoint."
        )
        return False
    if result.returncode:
        rank_zero_warn(
            f"`scontrol requeue {job}` failed ({result.stderr.strip()}); submit the job with --requeue, "
            "or resubmit it: it resumes from the checkpoint."
        )
        return False
    rank_zero_info(f"SLURM job {job} requeued")
    return True
