"""What ``lightning-kd predict`` writes: for GLUE, the folder GLUE's server takes (GLUESubmissionWriter); for
SQuAD, the files the official evaluation scripts take (SquadPredictionWriter)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_kd.datamodules.common import task_metrics
from lightning_kd.datamodules.glue import GLUEDataModule
from lightning_kd.datamodules.glue_tasks import submission_lines
from lightning_kd.datamodules.squad_metrics import SquadMetrics
from lightning_kd.files import atomic_write


class GLUESubmissionWriter(L.Callback):
    """Collects what ``predict_step`` returns (``{"idx", "logits"}``) per test set and writes one
    ``<Task>.tsv`` per set (``CoLA.tsv`` ... ``MNLI-m.tsv``, ``MNLI-mm.tsv``, ``AX.tsv``) into ``output_dir``:
    zip the folder's files and upload them. Under DDP every rank's share is gathered on rank 0, and the rows a
    sampler repeated to even out the ranks are written once.
    """

    def __init__(self, output_dir: str = "glue_submission") -> None:
        self.output_dir = output_dir
        self.collected: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.written: list[Path] = []

    @override
    @property
    def state_key(self) -> str:
        return f"GLUESubmissionWriter[output_dir={self.output_dir}]"

    @override
    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(trainer.datamodule, GLUEDataModule):
            raise TypeError(
                "GLUESubmissionWriter writes GLUE test-set predictions: predict with a GLUEDataModule "
                f"(got {type(trainer.datamodule).__name__}), or remove the callback."
            )
        self.collected = {}

    @override
    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, dict) or "idx" not in outputs or "logits" not in outputs:
            raise TypeError(
                "predict_step must return {'idx': test-set indices, 'logits': outputs} for the writer"
            )
        self.collected.setdefault(dataloader_idx, []).append(
            (outputs["idx"].detach().cpu(), outputs["logits"].detach().float().cpu())
        )

    @override
    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule: GLUEDataModule = trainer.datamodule
        parts = {
            i: (torch.cat([p[0] for p in rows]), torch.cat([p[1] for p in rows]))
            for i, rows in self.collected.items()
        }
        if trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, parts)
            parts = {
                i: (torch.cat([g[i][0] for g in gathered]), torch.cat([g[i][1] for g in gathered]))
                for i in parts
            }
        if not trainer.is_global_zero:
            return
        folder = Path(self.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.written = []
        for i, name in enumerate(datamodule.submission_names):
            if i not in parts:
                continue
            indices, outputs = parts[i]
            first = {}
            for position, index in enumerate(indices.tolist()):
                first.setdefault(index, position)  # a DistributedSampler repeats rows to even out the ranks
            keep = torch.tensor(sorted(first.values()), dtype=torch.long)
            path = folder / f"{name}.tsv"
            lines = submission_lines(datamodule.task, indices[keep], outputs[keep])
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            self.written.append(path)
        rank_zero_info(
            f"GLUE submission files written to {folder.resolve()}: "
            f"{', '.join(p.name for p in self.written)} (zip them and upload)"
        )


class SquadPredictionWriter(L.Callback):
    """Collects what ``predict_step`` returns (``{"window", "logits"}``: each window's start and end logits) and
    writes into ``output_dir`` what SQuAD's official evaluation scripts take: ``predictions.json`` (``{id:
    answer}``) and, for v2.0, ``null_odds.json`` (``{id: null score - best span score}``, the v2.0 script's
    ``--na-prob-file``). Under DDP every rank's windows are gathered; rank 0 writes. The answers follow the
    DataModule's ``n_best``, ``max_answer_length`` and ``null_score_diff_threshold``.
    """

    def __init__(self, output_dir: str = "squad_predictions") -> None:
        self.output_dir = output_dir
        self.metrics: SquadMetrics | None = None
        self.written: list[Path] = []

    @override
    @property
    def state_key(self) -> str:
        return f"SquadPredictionWriter[output_dir={self.output_dir}]"

    @override
    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = task_metrics(trainer.datamodule, prefix="predict")
        if not isinstance(metrics, SquadMetrics):
            raise TypeError(
                "SquadPredictionWriter writes SQuAD answers: predict with a SQuADDataModule "
                f"(got {type(trainer.datamodule).__name__}), or remove the callback."
            )
        self.metrics = metrics.to(pl_module.device)

    @override
    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, dict) or "window" not in outputs or "logits" not in outputs:
            raise TypeError(
                "predict_step must return {'window': window indices, 'logits': [B, 2, T] start and end "
                "logits} for SquadPredictionWriter"
            )
        assert self.metrics is not None
        self.metrics.update(outputs["logits"], outputs["window"])

    @override
    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.metrics is not None
        answers, _ = self.metrics.answers()  # every rank takes part in the gather
        if not trainer.is_global_zero:
            return
        folder = Path(self.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        files = {"predictions.json": answers.answers}
        if self.metrics.reference.version_2:
            files["null_odds.json"] = answers.null_odds
        self.written = []
        for name, content in files.items():
            with atomic_write(folder / name, "w") as handle:
                json.dump(content, handle, ensure_ascii=False, indent=1)
            self.written.append(folder / name)
        rank_zero_info(
            f"SQuAD answers to {len(answers.answers)} questions written to {folder.resolve()}: "
            f"{', '.join(p.name for p in self.written)} (the official evaluation script's input)"
        )
