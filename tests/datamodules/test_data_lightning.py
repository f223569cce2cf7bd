"""PretrainingDataModule under a Trainer (max_steps, checkpoint, resume) and under two DDP ranks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers_data import data_trainer
from kd_datafiles import TOKENIZER, write_lines
from torch import nn

from lightning_kd.datamodules import PretrainingDataModule


class Recorder(L.LightningModule):
    """Remembers a fingerprint of every batch it trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.seen: list[int] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append(
            int(
                (
                    batch["input_ids"] * torch.arange(batch["input_ids"].numel()).view_as(batch["input_ids"])
                ).sum()
            )
        )
        return self.layer(batch["attention_mask"][:, :1].float()).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resumed_fit_continues_the_stream(tmp_path, num_workers):
    path = tmp_path / "corpus.txt"
    write_lines(path, 150)

    def data() -> PretrainingDataModule:
        return PretrainingDataModule(
            TOKENIZER, [str(path)], max_length=32, batch_size=4, num_workers=num_workers
        )

    straight = Recorder()
    data_trainer(tmp_path / "a", 8, enable_checkpointing=False).fit(straight, datamodule=data())

    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1
    )
    first = Recorder()
    data_trainer(tmp_path / "b", 3, callbacks=[checkpoint]).fit(first, datamodule=data())
    (saved,) = list((tmp_path / "ckpt").glob("*.ckpt"))
    state = torch.load(saved, weights_only=False)["PretrainingDataModule"]
    assert state["positions"]["0"]["batches"] == 3

    second = Recorder()
    data_trainer(tmp_path / "c", 8, enable_checkpointing=False).fit(
        second, datamodule=data(), ckpt_path=saved
    )
    assert first.seen == straight.seen[:3]
    assert second.seen == straight.seen[3:], "the resumed run did not continue where the first stopped"


def _rank_main(rank: int, folder: str, corpus: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["KD_TEST_PORT"])
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        dm = PretrainingDataModule(TOKENIZER, [corpus], max_length=32, batch_size=4, repeat=False)
        dm.train_dataloader()
        batches = list(torch.utils.data.DataLoader(dm._dataset, batch_size=None))
        from helpers_data import documents_by_reader

        docs = documents_by_reader(batches, dm.tokenizer)
        loader = dm.train_dataloader()
        for _ in zip(range(2), loader, strict=False):
            pass
        state = dm.state_dict()  # a collective: every rank's positions end up in every rank's copy
        Path(folder, f"rank{rank}.json").write_text(json.dumps({"docs": docs, "state": state}))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ddp_ranks_see_every_document_once(tmp_path, tokenizer):
    import socket

    from helpers_data import normalised

    corpus = tmp_path / "corpus.txt"
    lines = write_lines(corpus, 90)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        os.environ["KD_TEST_PORT"] = str(probe.getsockname()[1])
    torch.multiprocessing.spawn(_rank_main, args=(str(tmp_path), str(corpus)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    docs = results[0]["docs"]["0"] + results[1]["docs"]["1"]
    assert sorted(docs) == sorted(normalised(lines, tokenizer)), "a document was skipped or read twice"
    assert not set(results[0]["docs"]["0"]) & set(results[1]["docs"]["1"])
    for result in results:
        assert sorted(result["state"]["positions"]) == ["0", "1"]
