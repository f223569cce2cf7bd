"""HomoDistil on two CPU processes (DDP over gloo); every rank saves the masks it chose and its student.

Run by test_pruning_ddp.py as ``python ddp_pruning_run.py OUT_DIR ARCH...``: ``bert`` (a masked LM) or
``llama`` (a causal LM with grouped-query attention, task causal-lm), each in turn in the same two processes
(starting them is most of the cost), into ``OUT_DIR/ARCH``. Lightning starts the second rank by running this
script again. The student shrinks physically at every event, so DDP is re-wrapped each time.
``single_process`` runs the same training in one process: both ranks' batches as two accumulated
micro-batches, which averages the same gradients DDP averages.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS / "distillation")]
from kd_helpers import make_batch, tiny_bert_config  # noqa: E402
from test_causal_lm import causal_batch  # noqa: E402
from tiny_models import make_model  # noqa: E402
from transformers import BertForMaskedLM  # noqa: E402

from lightning_kd import DistillationModule, PruningCallback  # noqa: E402

ARCHITECTURES = ("bert", "llama")


def batch(arch: str, seed: int) -> dict[str, torch.Tensor]:
    return make_batch(seed=seed) if arch == "bert" else causal_batch(seed=seed)


class RankBatches(L.LightningDataModule):
    """Different batches on every rank, as a sharded corpus gives: only synchronised statistics agree."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        self.arch = arch

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank
        return DataLoader([batch(self.arch, 100 * rank + i) for i in range(4)], batch_size=None)


class MaskHistory(L.Callback):
    def __init__(self, pruning: PruningCallback) -> None:
        self.pruning, self.history = pruning, []

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if self.pruning.last_event == trainer.global_step:
            self.history.append({k: v.clone() for k, v in self.pruning.masks.items()})


class BothRanks(RankBatches):
    """Rank 0's batch, then rank 1's, for each step."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            [batch(self.arch, 100 * rank + i) for i in range(4) for rank in (0, 1)], batch_size=None
        )


def build(out: Path, arch: str) -> tuple[DistillationModule, PruningCallback]:
    if arch == "bert":
        torch.manual_seed(0)
        teacher = BertForMaskedLM(tiny_bert_config())
        settings = {"objective": [{"term": "logits"}, {"term": "hidden"}, {"term": "task"}]}
    else:  # 3 blocks of 8 query heads in 4 key/value groups; halving keeps 2 groups
        teacher = make_model("llama")
        settings = {
            "task": "causal-lm",
            "objective": [{"term": "tokens"}, {"term": "hidden"}, {"term": "task"}],
        }
    module = DistillationModule(teacher, {"init": "copy"}, learning_rate=1e-3, **settings)
    pruning = PruningCallback(
        {"heads": 0.5, "ffn": 0.5, "hidden": 0.5}, end_step=6, interval=2, export_dir=str(out / "student")
    )
    return module, pruning


def single_process(out: Path, arch: str = "bert") -> DistillationModule:
    module, pruning = build(out, arch)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=8,
        logger=False,
        accumulate_grad_batches=2,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruning],
    )
    trainer.fit(module, BothRanks(arch))
    return module


def main(out: Path, arch: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    module, pruning = build(out, arch)
    history = MaskHistory(pruning)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[pruning, history],
    )
    trainer.fit(module, RankBatches(arch))
    torch.save(
        {
            "history": history.history,
            "events": pruning.events,
            "student": {k: v.clone() for k, v in module.student.state_dict().items()},
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    for name in sys.argv[2:] or ["bert"]:
        main(Path(sys.argv[1]) / name, name)
