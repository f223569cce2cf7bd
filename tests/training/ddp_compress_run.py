"""Distillation on two CPU processes (DDP over gloo) with gradients all-reduced in bf16, then in fp32, in the
same two processes (starting them is most of the cost); every rank saves its student and the dtype its
all-reduce carried.

The student trains with plain SGD: unlike AdamW, whose update ignores the gradient's scale, SGD moves the weights
by the reduced gradient itself, so an all-reduce that summed instead of averaging would double every update.
``single_process`` runs the same training in one process, both ranks' batches as two accumulated micro-batches
(Lightning divides each micro-batch's loss by two): the update DDP's average must reproduce.

Run by test_compressed_ddp.py as ``python ddp_compress_run.py OUT_DIR``; Lightning starts the second rank by
running this script again.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kd_helpers import make_batch, tiny_bert_config  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks  # noqa: E402
from transformers import BertForMaskedLM  # noqa: E402

from lightning_kd import DistillationModule  # noqa: E402
from lightning_kd.objective import PREDICTION_POSITIONS, prediction_positions  # noqa: E402
from lightning_kd.training.distributed import compressed_ddp  # noqa: E402

STEPS = 6
LEARNING_RATE = 0.05
SEEN: list[torch.dtype] = []  # the gradient buckets the hook was given


def recording(hook):  # noqa: ANN001, ANN201
    def wrapped(state, bucket):  # noqa: ANN001, ANN202
        SEEN.append(bucket.buffer().dtype)
        return hook(state, bucket)

    return wrapped


def batch(rank: int, i: int) -> dict[str, torch.Tensor]:
    b = make_batch(seed=100 * rank + i)
    return {**b, PREDICTION_POSITIONS: prediction_positions(b["labels"])}


class RankBatches(L.LightningDataModule):
    """Different batches on every rank, as a sharded corpus gives."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader([batch(self.trainer.global_rank, i) for i in range(4)], batch_size=None)


class BothRanks(L.LightningDataModule):
    """Rank 0's batch, then rank 1's, for each step: the union of what the two ranks see."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader([batch(rank, i) for i in range(4) for rank in (0, 1)], batch_size=None)


class SGDDistillation(DistillationModule):
    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.learning_rate)


def build(learning_rate: float = LEARNING_RATE) -> SGDDistillation:
    torch.manual_seed(0)
    teacher = BertForMaskedLM(tiny_bert_config())
    return SGDDistillation(
        teacher,
        {"init": "layers", "num_layers": 2},
        learning_rate=learning_rate,
        task="masked-lm",
        objective=[{"term": "logits"}, {"term": "hidden"}, {"term": "task"}],
    )


def trainer(**settings: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **settings,
    )


def single_process(learning_rate: float = LEARNING_RATE) -> dict[str, torch.Tensor]:
    module = build(learning_rate)
    trainer(devices=1, accumulate_grad_batches=2).fit(module, BothRanks())
    return {k: v.clone() for k, v in module.student.state_dict().items()}


def run(out: Path, compression: str) -> None:
    SEEN.clear()
    module = build()
    strategy = compressed_ddp("bf16")
    # counted, so the test knows the hook ran; the float32 reference goes through DDP's plain all-reduce hook
    strategy._ddp_comm_hook = recording(
        strategy._ddp_comm_hook if compression == "bf16" else default_hooks.allreduce_hook
    )
    ddp = trainer(devices=2, strategy=strategy, use_distributed_sampler=False)
    ddp.fit(module, RankBatches())
    torch.save(
        {
            "student": {k: v.clone() for k, v in module.student.state_dict().items()},
            "buckets": len(SEEN),
            "bucket_dtypes": sorted({str(d) for d in SEEN}),
        },
        out / f"{compression}-rank{ddp.global_rank}.pt",
    )


if __name__ == "__main__":
    for compression in ("bf16", "fp32"):
        run(Path(sys.argv[1]), compression)
