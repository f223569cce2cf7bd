"""Checkpoints that survive being killed while they are written, and resumes that never change a run silently.

Lightning's default writer serialises the checkpoint into memory and hands it to fsspec, whose local
"transaction" writes a temporary file in the system temp folder and then moves it into place. When the temp
folder and the checkpoint folder are different file systems (a node-local ``/tmp`` and a shared cluster file
system, the usual case under SLURM), that move is a copy, and a job killed during the copy leaves a truncated
``last.ckpt`` that the next ``--ckpt_path last`` picks. Nothing is flushed to disk either, so a node crash can
leave an empty file.

:class:`AtomicCheckpointIO` writes next to the target, under a name no checkpoint search matches, flushes and
fsyncs it, and renames it over the target: the rename is atomic on a POSIX file system, so the target is
always either the previous complete checkpoint or the new complete one. ``lightning-kd fit`` installs it;
with a plain ``Trainer`` pass ``plugins=[AtomicCheckpointIO()]``. A checkpoint it cannot read is reported with
its path.

:func:`check_resume` is the resume policy of every lightning-kd module: a fit resumed with hyper-parameters that
differ from the checkpoint's is refused with the list of differences, unless the module's ``allow_changes``
names each of them; then they apply (optimizer settings included, which the restored optimizer state would
otherwise overwrite) with a warning naming each.
"""

from __future__ import annotations

import glob
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_kd.files import atomic_write, faults_named, staging_path
from lightning_kd.training.lightning_internals import attached_trainer
from lightning_kd.training.provenance import ArtifactMismatch

PARTIAL = ".partial"


def partial_path(path: _PATH) -> Path:
    """Where ``path`` is written before it is renamed into place: hidden, and not ending in ``.ckpt``."""
    return staging_path(path, PARTIAL)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic and durable (write aside, fsync, rename).

    Remote paths (``s3://`` and the like) keep Lightning's writer: object stores publish an object only once
    it is complete.
    """

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        newest = lambda: newest_checkpoint(target.parent)  # noqa: E731
        with faults_named(target, "checkpoint", newest):
            target.parent.mkdir(parents=True, exist_ok=True)
        # A full disk is raised naming it and the newest complete checkpoint, not as PyTorch's "unexpected pos".
        with atomic_write(target, "wb", suffix=PARTIAL, what="checkpoint", newest=newest) as handle:
            # Straight to the file: no second in-memory copy of a multi-GB checkpoint.
            torch.save(checkpoint, handle)
        # What writers killed earlier left for this target is never a complete checkpoint, only wasted disk.
        for stale in target.parent.glob(f".{glob.escape(target.name)}.*{PARTIAL}"):
            stale.unlink(missing_ok=True)

    @override
    def load_checkpoint(self, path: _PATH, *args: Any, **kwargs: Any) -> dict[str, Any]:
        check_readable(path)
        return super().load_checkpoint(path, *args, **kwargs)


def check_readable(path: _PATH) -> None:
    """Raise, naming ``path``, if a local checkpoint is missing or cut short (torch's own error names neither).

    Reads only the zip directory at the end of the file, which a truncated write never reaches."""
    if not _is_local(path):
        return
    target = Path(path)
    if not target.is_file():
        raise FileNotFoundError(f"checkpoint {target} does not exist; check --ckpt_path (or use 'last').")
    try:
        with zipfile.ZipFile(target):
            pass
    except (zipfile.BadZipFile, OSError) as error:
        raise RuntimeError(
            f"checkpoint {target} cannot be read ({error}): it is truncated or not a checkpoint, e.g. a job killed "
            f"while writing it without AtomicCheckpointIO. Resume from an earlier checkpoint in {target.parent}."
        ) from error


def newest_checkpoint(folder: str | Path) -> Path | None:
    """The most recently written complete ``.ckpt`` in ``folder`` (its zip directory is whole), or ``None``."""
    try:
        found = sorted(Path(folder).glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return None
    for candidate in found:
        try:
            with zipfile.ZipFile(candidate):
                return candidate
        except (zipfile.BadZipFile, OSError):
            continue
    return None


def _is_local(path: _PATH) -> bool:
    return type(get_filesystem(path)).__name__ == "LocalFileSystem"


def install_atomic_checkpoints(trainer: Any) -> None:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` unless the user chose a checkpoint writer of their own."""
    strategy = trainer.strategy
    current = getattr(strategy, "_checkpoint_io", None)
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


# module hyper-parameter -> AdamW param-group key, for settings the restored optimizer state would overwrite
OPTIMIZER_SETTINGS = {
    "learning_rate": "lr",
    "weight_decay": "weight_decay",
    "betas": "betas",
    "eps": "eps",
    "adam_epsilon": "eps",
}
NOT_COMPARED = {"allow_changes", "_instantiator", "_class_path"}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping) or hasattr(value, "as_dict"):
        items = value.as_dict() if hasattr(value, "as_dict") else value
        return {str(k): _plain(v) for k, v in items.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def resume_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{name: (checkpoint's value, current value)}`` for every hyper-parameter that differs."""
    keys = sorted((set(saved) | set(current)) - NOT_COMPARED)
    missing = "(not set)"
    return {
        key: (saved.get(key, missing), current.get(key, missing))
        for key in keys
        if _plain(saved.get(key, missing)) != _plain(current.get(key, missing))
    }


def resuming_fit(module: Any) -> bool:
    """Whether ``module`` is loading a checkpoint to go on training (``trainer.fit(ckpt_path=...)``), where the
    resume policy applies; ``load_from_checkpoint(path, **overrides)`` and evaluation take what they are given."""
    trainer = attached_trainer(module)
    return trainer is not None and trainer.state.fn == "fit"


def check_resume(
    checkpoint: dict[str, Any], hparams: Mapping[str, Any], allow_changes: Iterable[str]
) -> None:
    """Refuse to resume ``checkpoint`` with other hyper-parameters than it was written with, unless every change
    is named in ``allow_changes``; then apply the optimizer's settings to the state about to be restored."""
    changes = resume_changes(checkpoint.get("hyper_parameters") or {}, hparams)
    allowed = set(allow_changes)
    refused = {k: v for k, v in changes.items() if k not in allowed}
    if refused:
        listed = "; ".join(f"{k}: checkpoint {old!r}, now {new!r}" for k, (old, new) in refused.items())
        names = ", ".join(refused)
        raise ValueError(
            f"this run differs from the checkpoint it resumes: {listed}. Resume with the checkpoint's values "
            f"(drop these options), or change them on purpose with allow_changes=[{names}] (CLI: "
            f"--model.init_args.allow_changes '[{names}]')."
        )
    for key, (old, new) in changes.items():
        rank_zero_warn(f"resuming with {key}={new!r} instead of the checkpoint's {old!r} (allow_changes).")
        if key in OPTIMIZER_SETTINGS:
            _apply_optimizer_setting(checkpoint, OPTIMIZER_SETTINGS[key], old, new)


def _apply_optimizer_setting(checkpoint: dict[str, Any], group_key: str, old: Any, new: Any) -> None:
    for state in checkpoint.get("optimizer_states", []):
        for group in state.get("param_groups", []):
            if group_key == "lr":
                # keep the schedule's position: the current rate is the base rate times the schedule's factor
                factor = group["lr"] / old if old else 1.0
                group["lr"], group["initial_lr"] = new * factor, new
            elif group_key == "weight_decay":
                if group.get("weight_decay"):  # the no-decay group (biases, norms) stays at 0
                    group["weight_decay"] = new
            else:
                group[group_key] = tuple(new) if isinstance(new, list) else new
    if group_key == "lr":
        for scheduler in checkpoint.get("lr_schedulers", []):
            if "base_lrs" in scheduler:
                scheduler["base_lrs"] = [new] * len(scheduler["base_lrs"])
            if old and "_last_lr" in scheduler:
                scheduler["_last_lr"] = [lr * new / old for lr in scheduler["_last_lr"]]


def checkpoint_path_of(module: Any) -> str:
    """The checkpoint ``module`` is loading, as far as its Trainer knows (for messages)."""
    trainer = attached_trainer(module)
    return str(getattr(trainer, "ckpt_path", None) or "this checkpoint")


def check_checkpoint_fits(checkpoint: Mapping[str, Any], module: Any, model_attribute: str) -> None:
    """Refuse, before PyTorch's ``size mismatch`` list, a checkpoint whose weights have other shapes than
    ``module``'s: another task's head (a 2-label SST-2 classifier loaded for 3-label MNLI), another student.

    Names both tasks when the checkpoint's differs, and how to use the checkpoint: load it with its own task,
    or make a model folder of it to start a new task from.
    """
    saved = checkpoint.get("state_dict")
    if not isinstance(saved, Mapping):
        return
    current = module.state_dict()
    mismatched = [
        (name, tuple(value.shape), tuple(current[name].shape))
        for name, value in saved.items()
        if name in current and hasattr(value, "shape") and tuple(value.shape) != tuple(current[name].shape)
    ]
    if not mismatched:
        return
    path = checkpoint_path_of(module)
    listed = "; ".join(
        f"{name}: {theirs} in the checkpoint, {mine} here" for name, theirs, mine in mismatched[:3]
    )
    more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
    made = (checkpoint.get("lightning_kd") or {}).get("made_with") or {}
    # the record first: load_from_checkpoint writes its overrides into the checkpoint's hyper_parameters
    theirs = made.get("task") or (checkpoint.get("hyper_parameters") or {}).get("task")
    mine = getattr(module, "hparams", {}).get("task")
    labels = made.get("labels")
    cls = type(module).__name__
    if theirs is not None and mine is not None and theirs != mine:
        of = f" ({labels} labels)" if labels else ""
        raise ArtifactMismatch(
            f"{path} was trained for task {theirs!r}{of}, but this {cls} is set up for {mine!r}: its head does not "
            f"fit ({listed}{more}). To evaluate or resume it, load it with task: {theirs} (CLI: "
            f"--model.init_args.task {theirs}). To train {mine!r} from it, save its model as a folder "
            f"({cls}.load_from_checkpoint({str(path)!r}).{model_attribute}.save_pretrained('folder')) and start "
            f"a new run from that folder with task {mine!r}, which gets a new head "
            "(model_kwargs: {ignore_mismatched_sizes: true} where the label count differs)."
        )
    raise ArtifactMismatch(
        f"{path} holds weights of other shapes than this {cls} ({listed}{more}): it was made with another model "
        "or head. Build the module with the settings the checkpoint was trained with (its hyper_parameters; "
        f"{cls}.load_from_checkpoint(path) without overrides does), or start from a checkpoint of this model."
    )
