"""DistillationReport: sizes, the discrepancy before and after, and the exported student, in a few lines."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lightning_kd.distillation.contract import DistillationRun
from lightning_kd.hub import push_folder
from lightning_kd.pruning.export import check_export_dir

log = logging.getLogger(__name__)

# Half the last printed digit of ``:.4f``: a value this close to 0 prints as 0.0000, never as -0.0000.
PRINTED_ZERO = 5e-5


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def natural_key(name: str) -> list[int | str]:
    """Sort key that orders the numbers inside a name by value: ``layer_2`` before ``layer_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def format_discrepancy(value: float) -> str:
    """``value`` to four decimals. Every discrepancy metric is non-negative (a KL, an MSE, 1 - CKA); a copied
    layer measures 0 up to float rounding, which can fall just below 0 and would print as -0.0000. Values that
    print as zero print as 0.0000; anything else, a clearly negative one included, prints as it is."""
    return f"{0.0 if abs(value) < PRINTED_ZERO else value:.4f}"


def discrepancy_lines(start: dict[str, float], end: dict[str, float]) -> list[str]:
    """One line per metric, the mean before its layers and the layers by number, start and end side by side."""
    return [
        f"  {key:34s} start {format_discrepancy(start.get(key, float('nan')))}   "
        f"end {format_discrepancy(end[key])}"
        for key in sorted(end, key=natural_key)
    ]


def size_lines(pl_module: L.LightningModule) -> list[str]:
    """The teacher's and the student's sizes for a distillation module, the model's size for any other."""
    teacher, student = getattr(pl_module, "teacher", None), getattr(pl_module, "student", None)
    if isinstance(teacher, torch.nn.Module) and isinstance(student, torch.nn.Module):
        t, s = _parameters(teacher), _parameters(student)
        return [
            f"teacher: {type(teacher).__name__}, {t / 1e6:.2f}M parameters",
            f"student: {type(student).__name__}, {s / 1e6:.2f}M parameters ({s / t:.0%} of the teacher)",
        ]
    # a module that trains one model (FineTuningModule): name that model rather than the LightningModule around it
    trained = [child for child in pl_module.children() if any(True for _ in child.parameters())]
    model = trained[0] if len(trained) == 1 else pl_module
    return [f"model: {type(model).__name__}, {_parameters(model) / 1e6:.2f}M parameters"]


class ModelSize(L.Callback):
    """Prints the model's size when fit starts, in :func:`size_lines`' words: what ``lightning-kd fit`` shows
    instead of Lightning's model summary table when the recipe has no :class:`DistillationReport`."""

    @override
    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log.info("\n".join(size_lines(pl_module)))


class DistillationReport(L.Callback):
    """Prints teacher and student sizes, the discrepancy on the first training batch at the start and at the
    end of fit (the same batch both times, so the two numbers compare), and saves the student as a Hugging
    Face folder in ``export_dir`` with the DataModule's tokenizer, the task's label names and a model card, so
    ``AutoModel.from_pretrained`` loads it; ``push_to_hub`` (a repo id such as ``me/minilm-sst2``) uploads the
    folder too (a ``private`` repo unless told otherwise; the token comes from ``huggingface-cli login`` or ``HF_TOKEN``).
    With a PruningCallback, the student it reports and saves is the physically pruned one (pruning happens
    when training ends, before fit ends).
    """

    def __init__(
        self, export_dir: str | None = None, push_to_hub: str | None = None, private: bool = True
    ) -> None:
        if push_to_hub and not export_dir:
            raise ValueError("push_to_hub uploads the exported folder: set export_dir too")
        self.export_dir = export_dir
        self.push_to_hub, self.private = push_to_hub, private
        self.probe: dict[str, torch.Tensor] | None = None
        self.start: dict[str, float] = {}
        self.end: dict[str, float] = {}

    @override
    @property
    def state_key(self) -> str:
        return f"DistillationReport[export_dir={self.export_dir}]"

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.export_dir:
            check_export_dir(self.export_dir)

    @override
    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log.info("\n".join(size_lines(pl_module)))

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.probe is None:
            self.probe = {
                k: v.detach().cpu().clone() for k, v in batch.items() if isinstance(v, torch.Tensor)
            }
            self.start = pl_module.discrepancy([self.probe])

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.probe is None:
            return
        self.end = pl_module.discrepancy([self.probe])
        self._print_and_export(trainer, pl_module)

    @rank_zero_only
    def _print_and_export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        lines = ["teacher-student discrepancy on the first batch (lower is closer):"]
        log.info("\n".join([*lines, *discrepancy_lines(self.start, self.end)]))
        gap = pl_module.evaluation_summary() if isinstance(pl_module, DistillationRun) else []
        if gap:
            log.info("\n".join(["task metrics at the last evaluation (gap = teacher - student):", *gap]))
        if self.export_dir:
            discrepancy = {k: (self.start.get(k, float("nan")), v) for k, v in self.end.items()}
            path = pl_module.save_student(Path(self.export_dir), probe=self.probe, discrepancy=discrepancy)
            log.info(
                f"student saved to {Path(path).resolve()} (load it with transformers.AutoModel.from_pretrained)"
            )
            if self.push_to_hub:
                log.info(f"student pushed to {push_folder(path, self.push_to_hub, private=self.private)}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"probe": self.probe, "start": self.start}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.probe, self.start = state_dict["probe"], state_dict["start"]
