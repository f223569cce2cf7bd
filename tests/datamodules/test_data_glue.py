"""GLUEDataModule on GLUE's TSV layout, TaskMetrics, and fine-tuning through the same Lightning pieces."""

from __future__ import annotations

import time

import lightning as L
import pytest
import torch
from kd_datafiles import GLUE_FOLDERS, TOKENIZER, write_glue_task
from transformers import BertConfig, BertForSequenceClassification

from lightning_kd.datamodules import DataSourceError, GLUEDataModule
from lightning_kd.datamodules.glue_metrics import TaskMetrics
from lightning_kd.finetuning.module import FineTuningModule

EXPECTED = {  # task -> (num_labels, validation names, metric keys)
    "cola": (2, ["validation"], ["val/cola/matthews_correlation"]),
    "sst2": (2, ["validation"], ["val/sst2/accuracy"]),
    "mrpc": (2, ["validation"], ["val/mrpc/f1", "val/mrpc/accuracy"]),
    "qqp": (2, ["validation"], ["val/qqp/f1", "val/qqp/accuracy"]),
    "stsb": (1, ["validation"], ["val/stsb/pearson", "val/stsb/spearman"]),
    "mnli": (
        3,
        ["validation_matched", "validation_mismatched"],
        ["val/mnli/validation_matched/accuracy", "val/mnli/validation_mismatched/accuracy"],
    ),
    "qnli": (2, ["validation"], ["val/qnli/accuracy"]),
    "rte": (2, ["validation"], ["val/rte/accuracy"]),
    "wnli": (2, ["validation"], ["val/wnli/accuracy"]),
}


@pytest.mark.parametrize("task", list(EXPECTED))
def test_every_task_reads_its_tsv_layout(task, glue_dir, tokenizer):
    dm = GLUEDataModule(task, TOKENIZER, data_dir=str(glue_dir), max_length=64, batch_size=8)
    num_labels, names, _ = EXPECTED[task]
    assert dm.num_labels == num_labels and dm.is_regression == (task == "stsb")
    assert dm.validation_names == names
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 40  # CoLA has no header: its first row is data
    assert all(len(dm.datasets[name]) == 24 for name in names)
    loaders = dm.val_dataloader()
    assert (isinstance(loaders, list) and len(loaders) == 2) == (task == "mnli")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["labels"].dtype == (torch.float32 if task == "stsb" else torch.long)
    # Dynamic padding: the batch is as long as its longest row, and that row has no padding.
    assert (
        batch["input_ids"].shape[1] < 64
        and batch["attention_mask"].sum(1).max() == batch["input_ids"].shape[1]
    )
    if task == "mrpc":
        first = tokenizer.decode(dm.datasets["train"][1]["input_ids"])
        assert '" the witness,' in first, "a quote inside an MRPC sentence must stay in the text"
    if task in ("mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"):
        assert batch["token_type_ids"].max() == 1, "sentence pairs get segment ids"


def test_glue_data_dir_may_be_the_task_folder(glue_dir):
    dm = GLUEDataModule("SST-2", TOKENIZER, data_dir=str(glue_dir / "SST-2"))
    dm.setup("validate")
    assert dm.task_name == "sst2" and len(dm.datasets["validation"]) == 24


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match="unknown GLUE task 'mnli-mm'.*cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli"
    ):
        GLUEDataModule("mnli-mm", TOKENIZER)


def test_malformed_rows_name_file_and_line(tmp_path):
    folder = write_glue_task(tmp_path, "MRPC")
    lines = (folder / "dev.tsv").read_text().splitlines()
    lines[3] = "1\t1003\tonly one sentence here"
    (folder / "dev.tsv").write_text("\n".join(lines) + "\n")
    dm = GLUEDataModule("mrpc", TOKENIZER, data_dir=str(tmp_path))
    with pytest.raises(
        DataSourceError, match=r"MRPC/dev\.tsv, line 4: expected 5 tab-separated columns, found 3"
    ):
        dm.setup("validate")
    lines[3] = "maybe\t1003\t2003\tone\ttwo"
    (folder / "dev.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataSourceError, match=r"line 4: the label 'maybe' is not one of \['0', '1'\]"):
        GLUEDataModule("mrpc", TOKENIZER, data_dir=str(tmp_path)).setup("validate")
    skipping = GLUEDataModule("mrpc", TOKENIZER, data_dir=str(tmp_path), skip_malformed=True)
    with pytest.warns(UserWarning, match="skipped a malformed row"):
        skipping.setup("validate")
    assert len(skipping.datasets["validation"]) == 23
    sts = write_glue_task(tmp_path, "STS-B")
    (sts / "dev.tsv").write_text((sts / "dev.tsv").read_text().replace("\t2.500\n", "\tn/a\n", 1))
    with pytest.raises(DataSourceError, match=r"STS-B/dev\.tsv, line \d+: the score 'n/a' is not a number"):
        GLUEDataModule("stsb", TOKENIZER, data_dir=str(tmp_path)).setup("validate")


def test_empty_and_missing_inputs(tmp_path):
    folder = write_glue_task(tmp_path, "RTE")
    (folder / "dev.tsv").write_text("")
    with pytest.raises(DataSourceError, match=r"RTE/dev\.tsv: the file is empty"):
        GLUEDataModule("rte", TOKENIZER, data_dir=str(tmp_path)).setup("validate")
    (folder / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
    with pytest.raises(DataSourceError, match="no examples"):
        GLUEDataModule("rte", TOKENIZER, data_dir=str(tmp_path)).setup("validate")
    with pytest.raises(DataSourceError, match="no GLUE CoLA files"):
        GLUEDataModule("cola", TOKENIZER, data_dir=str(tmp_path)).setup("validate")


def test_offline_hub_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataSourceError, match=r"(?s)'nyu-mll/glue' cannot be reached.*data_dir="):
        GLUEDataModule("cola", TOKENIZER).setup("validate")
    assert time.perf_counter() - start < 5


def test_task_metrics_match_hand_computed_values():
    metrics = TaskMetrics.for_task("mrpc")
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    metrics.update(logits, torch.tensor([1, 0, 0, 1]))
    result = metrics.compute()
    assert result["val/mrpc/accuracy"] == pytest.approx(0.75)
    assert result["val/mrpc/f1"] == pytest.approx(0.8)  # precision 2/3, recall 1
    metrics.reset()
    mnli = TaskMetrics.for_task("mnli")
    mnli.update(torch.eye(3), torch.tensor([0, 1, 2]), dataloader_idx=0)
    mnli.update(torch.eye(3), torch.tensor([0, 0, 0]), dataloader_idx=1)
    result = mnli.compute()
    assert result["val/mnli/validation_matched/accuracy"] == pytest.approx(1.0)
    assert result["val/mnli/validation_mismatched/accuracy"] == pytest.approx(1 / 3)
    sts = TaskMetrics.for_task("sts-b")
    sts.update(torch.tensor([[0.1], [0.4], [0.35], [0.8]]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    result = sts.compute()
    assert result["val/stsb/spearman"] == pytest.approx(0.8) and 0.8 < result["val/stsb/pearson"] < 1.0
    cola = TaskMetrics.for_task("cola")
    cola.update(torch.tensor([[0.0, 1.0]] * 3 + [[1.0, 0.0]]), torch.tensor([1, 1, 0, 0]))
    assert cola.compute()["val/cola/matthews_correlation"] == pytest.approx(1 / 3**0.5)


def tiny_classifier(num_labels: int, vocab_size: int = 30522) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def quiet_trainer(tmp_path, **kwargs: object) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


@pytest.mark.parametrize("task", ["mrpc", "mnli", "stsb"])
def test_finetune_and_validate_report_the_official_metrics(task, glue_dir, tmp_path):
    dm = GLUEDataModule(task, TOKENIZER, data_dir=str(glue_dir), max_length=48, batch_size=8)
    module = FineTuningModule(tiny_classifier(dm.num_labels), task, learning_rate=1e-3)
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=2)
    trainer.fit(module, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    results = trainer.validate(module, datamodule=dm, verbose=False)
    assert len(results) == len(EXPECTED[task][1])
    logged = {key for result in results for key in result}
    for key in EXPECTED[task][2] + [f"val/{task}/score"]:
        assert key in logged


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(glue_dir, tmp_path):
    dm = GLUEDataModule("sst2", TOKENIZER, data_dir=str(glue_dir))
    module = FineTuningModule(tiny_classifier(2, vocab_size=1000), "sst2")
    with pytest.raises(
        ValueError, match="tokenizer has 30522 tokens but the model's embedding table has 1000 rows"
    ):
        quiet_trainer(tmp_path, max_steps=1).fit(module, datamodule=dm)


def test_every_glue_folder_is_covered():
    assert len(GLUE_FOLDERS) == len(EXPECTED) == 9
