"""Distillation on two CPU processes (DDP over gloo) with gradients all-reduced as ``sys.argv[2]`` (bf16 or
fp32); every rank saves its student and the dtype its all-reduce carried.

Run by test_compressed_ddp.py as ``python ddp_compress_run.py OUT_DIR COMPRESSION``; Lightning starts the second
rank by running this script again.
"""

from __future__ import annotations

import sys
from pathlib import Path

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

SEEN: list[torch.dtype] = []  # the gradient buckets the hook was given


def recording(hook):  # noqa: ANN001, ANN201
    def wrapped(state, bucket):  # noqa: ANN001, ANN202
        SEEN.append(bucket.buffer().dtype)
        return hook(state, bucket)

    return wrapped


class RankBatches(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank
        batches = [make_batch(seed=100 * rank + i) for i in range(4)]
        return DataLoader(
            [{**b, PREDICTION_POSITIONS: prediction_positions(b["labels"])} for b in batches], batch_size=None
        )


def main(out: Path, compression: str) -> None:
    torch.manual_seed(0)
    teacher = BertForMaskedLM(tiny_bert_config())
    module = DistillationModule(
        teacher,
        {"init": "layers", "num_layers": 2},
        learning_rate=1e-3,
        task="masked-lm",
        objective=[{"term": "logits"}, {"term": "hidden"}, {"term": "task"}],
    )
    strategy = compressed_ddp("bf16")
    # counted, so the test knows the hook ran; the float32 reference goes through DDP's plain all-reduce hook
    strategy._ddp_comm_hook = recording(
        strategy._ddp_comm_hook if compression == "bf16" else default_hooks.allreduce_hook
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module, RankBatches())
    torch.save(
        {
            "student": {k: v.clone() for k, v in module.student.state_dict().items()},
            "buckets": len(SEEN),
            "bucket_dtypes": sorted({str(d) for d in SEEN}),
        },
        out / f"{compression}-rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
