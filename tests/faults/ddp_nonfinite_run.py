"""Two CPU ranks (DDP over gloo) where only rank 1's loss turns NaN at step 3, its gradients staying finite.

Run by test_nonfinite_ddp.py as ``python ddp_nonfinite_run.py OUT_DIR POLICY``; every rank writes what it saw.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kd_helpers import make_batch, tiny_bert_config  # noqa: E402
from transformers import BertForMaskedLM  # noqa: E402

from lightning_kd import DistillationModule, NonFiniteError, NonFiniteGuard  # noqa: E402
from lightning_kd.objective import Features, KnowledgeTerm, Needs  # noqa: E402


class NaNOnRankOne(KnowledgeTerm):
    """NaN without a gradient path on rank 1's third step: only that rank's loss is bad, every gradient finite."""

    kind = "nan_on_rank_one"

    def __init__(self) -> None:
        super().__init__(weight=1.0)
        self.calls = 0

    def needs(self) -> Needs:
        return Needs(hidden_states=True)

    def forward(self, teacher: Features, student: Features, batch: Mapping[str, Tensor]) -> Tensor:
        self.calls += 1
        bad = self.calls == 3 and torch.distributed.get_rank() == 1
        return student.hidden_states[-1].sum() * 0.0 + (float("nan") if bad else 0.0)


class Snapshot(L.Callback):
    """The student after step 2, the last finite one."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step == 2:
            self.student = {k: v.clone() for k, v in pl_module.student.state_dict().items()}


class RankBatches(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank
        return DataLoader([make_batch(seed=100 * rank + i) for i in range(4)], batch_size=None)


def main(out: Path, policy: str) -> None:
    torch.manual_seed(0)
    module = DistillationModule(
        BertForMaskedLM(tiny_bert_config()),
        {"init": "layers", "num_layers": 2},
        objective=[{"term": "hidden"}, {"term": "logits"}, NaNOnRankOne()],
        learning_rate=1e-3,
    )
    guard, snapshot = NonFiniteGuard(policy=policy), Snapshot()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[guard, snapshot],
    )
    try:
        trainer.fit(module, RankBatches())
        stopped = ""
    except NonFiniteError as error:
        stopped = str(error)
    torch.save(
        {
            "stopped": stopped,
            "skipped": guard.skipped,
            "step": trainer.global_step,
            "student": {k: v.clone() for k, v in module.student.state_dict().items()},
            "student_at_2": snapshot.student,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
