"""One run, one history, across resumes and requeues.

Lightning starts a resumed fit's loggers as if the run were new: a second W&B run (a new id) and, for a
CSVLogger, a new ``version_<n+1>`` folder whose plot starts at the resumed step. Here a fit resumed from a
checkpoint (``--ckpt_path last``, as every SLURM requeue does) continues the loggers of the fit that wrote it:

- every checkpoint records the W&B run ids and CSV version folders of the run's loggers (:class:`LoggedRun`),
  and each CSVLogger writes its pending rows with it, so the file holds every row up to the checkpoint;
- before a resumed fit, :func:`continue_logged_run` reads them back from the checkpoint the fit resumes from:
  W&B continues the same run (same id, ``resume="allow"``), and each CSVLogger writes to the same folder, keeping
  the rows before the checkpoint's step (Lightning's writer would delete the file) and appending the resumed
  ones. Rows a killed run logged after its checkpoint are dropped: the resumed run logs those steps again.

The ``lightning-kd`` CLI does both for every fit; in Python, call :func:`continue_logged_run` before
``trainer.fit(..., ckpt_path=...)`` with the same ``ckpt_path``.
"""

from __future__ import annotations

import csv
import logging
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lightning_kd.training.lightning_internals import (
    pin_csv_version,
    resolve_fit_ckpt_path,
    wandb_init_kwargs,
    wandb_run_started,
)

log = logging.getLogger(__name__)

KEY = "logged_run"  # the checkpoint entry: {"wandb": [run id, ...], "csv": [version, ...]}, loggers in order
CSV_DELETION_WARNING = "Experiment logs directory"  # Lightning's, about a file this module keeps


class LoggedRun(L.Callback):
    """Records the run's W&B ids and CSV versions in every checkpoint, and writes the CSV rows logged so far."""

    @override
    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[KEY] = logger_identity(trainer)
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.save()  # rank zero only: a kill now still leaves the rows up to this checkpoint


def logger_identity(trainer: L.Trainer) -> dict[str, list[Any]]:
    """The W&B run ids and CSV versions of ``trainer``'s loggers, each kind in the order of ``trainer.loggers``."""
    return {
        "wandb": [str(logger.version) if logger.version else None for logger in _of(trainer, WandbLogger)],
        "csv": [logger.version for logger in _of(trainer, CSVLogger)],
    }


def continue_logged_run(trainer: L.Trainer, ckpt_path: str | os.PathLike | None) -> bool:
    """Make ``trainer``'s loggers continue the run that wrote the checkpoint ``ckpt_path`` resolves to (``last``
    and ``hpc`` as Lightning resolves them), and record them in every checkpoint from now on. Call it before
    ``trainer.fit(..., ckpt_path=ckpt_path)``. Returns whether the loggers continue a run.

    A checkpoint written before lightning-kd recorded its loggers, or a fit that starts fresh, starts new ones.
    """
    if not any(isinstance(callback, LoggedRun) for callback in trainer.callbacks):
        trainer.callbacks.append(LoggedRun())
    if str(ckpt_path or "").startswith("registry"):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning warns about a missing "last" checkpoint at fit anyway
        path = resolve_fit_ckpt_path(trainer, ckpt_path)
    if path is None:
        return False
    saved = _saved_identity(Path(path))
    if saved is None:
        return False
    identity, step = saved
    for logger, run_id in zip(_of(trainer, WandbLogger), identity.get("wandb", []), strict=False):
        settings = wandb_init_kwargs(logger)
        if run_id and not wandb_run_started(logger) and not settings.get("id"):
            settings.update(id=run_id, resume="allow")
            log.info(f"W&B: continuing run {run_id} (the checkpoint's)")
    for logger, version in zip(_of(trainer, CSVLogger), identity.get("csv", []), strict=False):
        if version is not None:
            _continue_csv(logger, version, step)
    return True


def _of(trainer: L.Trainer, kind: type) -> list[Any]:
    return [logger for logger in trainer.loggers if isinstance(logger, kind)]


def _saved_identity(path: Path) -> tuple[dict[str, list[Any]], int] | None:
    if not path.exists():  # Lightning says so when fit starts
        return None
    if not path.is_file():  # a sharded checkpoint folder: nothing recorded there
        log.info(f"{path} is not a single checkpoint file: the loggers start a new run")
        return None
    try:
        # memory-mapped: only the small entries are read, not the weights
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, OSError) as error:
        log.info(f"could not read the loggers of {path} ({error}): the loggers start a new run")
        return None
    identity = checkpoint.get(KEY)
    if not isinstance(identity, dict):
        log.info(
            f"{path} does not record its run's loggers (an older checkpoint): the loggers start a new run"
        )
        return None
    return identity, int(checkpoint.get("global_step", 0))


def _continue_csv(logger: CSVLogger, version: int | str, step: int) -> None:
    """Point ``logger`` at its earlier ``version`` folder and keep that file's rows logged before ``step``."""
    pin_csv_version(logger, version)
    # Lightning's rank from the launch environment, as its loggers read it: before fit, the strategy's ranks are
    # not set yet and every process's trainer reports global rank 0
    if getattr(rank_zero_only, "rank", 0) != 0:
        return
    metrics = Path(logger.log_dir) / "metrics.csv"
    rows: list[dict[str, str]] = []
    if metrics.is_file():
        with open(metrics, newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if _before(row, step)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=CSV_DELETION_WARNING)
        writer = logger.experiment  # created now, as it would be at setup: it deletes metrics.csv
    keys = sorted({key for row in rows for key, value in row.items() if value not in (None, "")})
    if rows:
        partial = metrics.with_name(f".{metrics.name}.partial")
        with open(partial, "w", newline="") as handle:
            out = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
            out.writeheader()
            out.writerows(rows)
        os.replace(partial, metrics)
        writer.metrics_keys = keys  # the writer appends under this header, or rewrites it with new names
    log.info(f"CSV: continuing {metrics} ({len(rows)} rows before step {step} kept)")


def _before(row: dict[str, str], step: int) -> bool:
    try:
        return float(row.get("step") or "nan") < step
    except ValueError:
        return False
