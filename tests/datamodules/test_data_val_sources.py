"""PretrainingDataModule(val_sources=...): held-out text read whole at every validation, the same batches each time,
in the training blocks' layout; no validation without it, and an empty or lone source refused."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from kd_datafiles import TOKENIZER, write_lines
from kd_helpers import quiet_trainer

from lightning_kd.datamodules import DataSourceError, PretrainingDataModule
from lightning_kd.datamodules.docstrings_tokenizer import DOCSTRINGS_TOKENIZER
from lightning_kd.datamodules.stream import POSITION_KEY


def causal_module(tmp_path: Path, **options: object) -> tuple[PretrainingDataModule, list[str]]:
    write_lines(tmp_path / "train.txt", 30)
    held_out = write_lines(tmp_path / "val.txt", 25, first=1000)
    dm = PretrainingDataModule(
        DOCSTRINGS_TOKENIZER,
        sources=[str(tmp_path / "train.txt")],
        val_sources=[str(tmp_path / "val.txt")],
        max_length=32,
        batch_size=4,
        lm="causal",
        **options,
    )
    return dm, held_out


def test_validation_reads_every_held_out_document_once_as_causal_blocks_and_again_alike(
    tmp_path: Path,
) -> None:
    dm, held_out = causal_module(tmp_path)
    tokenizer = dm.tokenizer
    batches = list(dm.val_dataloader())
    expected = [t for text in held_out for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    read = [
        t
        for b in batches
        for row, mask in zip(b["input_ids"], b["attention_mask"], strict=True)
        for t in row[mask.bool()]
    ]
    assert [int(t) for t in read] == expected  # each document once, in order, none of the training text
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask", "labels"} and POSITION_KEY not in batch
        assert torch.equal(
            batch["labels"], batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        )
    again = list(dm.val_dataloader())
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again, strict=True))


def test_masked_lm_validation_masks_alike_at_every_validation(tmp_path: Path) -> None:
    write_lines(tmp_path / "val.txt", 25)
    dm = PretrainingDataModule(
        TOKENIZER,
        sources=["docstrings"],
        val_sources=[str(tmp_path / "val.txt")],
        max_length=32,
        batch_size=4,
    )
    first, second = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert len(first) == len(second) > 1
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(first, second, strict=True))
    assert all((b["labels"] != -100).any() for b in first)  # masked, as the training blocks are


class CountValidation(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.validated = 0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.layer(batch["input_ids"][:, :1].float()).sum()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.validated += len(batch["input_ids"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("with_val", [True, False])
def test_a_trainer_validates_on_them_and_skips_validation_without_them(
    tmp_path: Path, with_val: bool
) -> None:
    dm, _ = causal_module(tmp_path)
    if not with_val:
        dm.val_sources = []
    module = CountValidation()
    trainer = quiet_trainer(
        max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0
    )
    trainer.fit(module, dm)
    blocks = sum(len(b["input_ids"]) for b in dm.val_dataloader()) if with_val else 0
    assert module.validated == 2 * blocks and (blocks > 0) == with_val


def test_an_empty_or_lone_validation_source_is_refused_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n\n")
    dm = PretrainingDataModule(TOKENIZER, sources=["docstrings"], val_sources=[str(tmp_path / "empty.txt")])
    with pytest.raises(DataSourceError, match="holds no documents"):
        dm.val_dataloader()
    with pytest.raises(ValueError, match=r"val_sources must be a list, e.g. val_sources: \['docstrings'\]"):
        PretrainingDataModule(TOKENIZER, sources=["docstrings"], val_sources="docstrings")
