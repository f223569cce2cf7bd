"""``predict`` with GLUESubmissionWriter on two CPU processes (DDP over gloo), MNLI test sets of an odd number
of rows. Twice: with Lightning's own predict sampler (unequal shares, nothing repeated), then with a
DistributedSampler that repeats a row to even out the ranks, which the writer must write once.

Run by test_data_glue_predict.py as ``python ddp_glue_predict_run.py GLUE_DIR OUT_DIR``; Lightning starts the
second rank by running this script again. Every rank writes the number of rows it predicted per test set.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler
from transformers import BertConfig, BertForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kd_datafiles import TOKENIZER  # noqa: E402

from lightning_kd import FineTuningModule, GLUEDataModule, GLUESubmissionWriter  # noqa: E402


def classifier() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        num_labels=3,
        # wide weights, so the rows get different classes and a row written under another's index shows
        initializer_range=0.5,
    )
    return BertForSequenceClassification(config).eval()


def data(glue_dir: Path) -> GLUEDataModule:
    return GLUEDataModule(
        "mnli", TOKENIZER, data_dir=str(glue_dir / "MNLI"), max_length=32, eval_batch_size=2
    )


class RepeatingSampler(GLUEDataModule):
    """Each test set through torch's DistributedSampler, which pads the shorter rank with a repeated row."""

    def predict_dataloader(self) -> list[DataLoader]:
        loaders = []
        for loader in super().predict_dataloader():
            sampler = DistributedSampler(loader.dataset, shuffle=False)
            loaders.append(
                DataLoader(loader.dataset, batch_size=2, sampler=sampler, collate_fn=loader.collate_fn)
            )
        return loaders


class CountRows(L.Callback):
    def __init__(self) -> None:
        self.rows: dict[int, int] = {}

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        self.rows[dataloader_idx] = self.rows.get(dataloader_idx, 0) + len(outputs["idx"])


def predict(datamodule: GLUEDataModule, out: Path, **settings: object) -> None:
    counter = CountRows()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[GLUESubmissionWriter(str(out)), counter],
        **settings,
    )
    trainer.predict(FineTuningModule(classifier(), "mnli"), datamodule, return_predictions=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}-rank{trainer.global_rank}.json").write_text(json.dumps(counter.rows))


def main(glue_dir: Path, out: Path) -> None:
    predict(data(glue_dir), out / "lightning")
    predict(
        RepeatingSampler(
            "mnli", TOKENIZER, data_dir=str(glue_dir / "MNLI"), max_length=32, eval_batch_size=2
        ),
        out / "repeated",
        use_distributed_sampler=False,
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
