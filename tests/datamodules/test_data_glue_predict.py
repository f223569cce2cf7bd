"""GLUE's test sets end to end: reading them (TSV and hub), `test` on the dev sets, and `predict` writing the
submission folder GLUE's server takes, for fine-tuning and distillation."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from kd_datafiles import TOKENIZER, submission_index, write_glue_task, write_glue_test_files
from kd_helpers import run_ranks_script
from transformers import BertConfig, BertForSequenceClassification

from lightning_kd import DistillationModule, FineTuningModule, GLUEDataModule, GLUESubmissionWriter
from lightning_kd.datamodules import DataSourceError

DDP_SCRIPT = Path(__file__).with_name("ddp_glue_predict_run.py")
sys.path.insert(0, str(DDP_SCRIPT.parent))
import ddp_glue_predict_run  # noqa: E402

SUBMISSION = {  # task -> (files, predictions GLUE expects)
    "cola": (["CoLA.tsv"], {"0", "1"}),
    "sst2": (["SST-2.tsv"], {"0", "1"}),
    "mrpc": (["MRPC.tsv"], {"0", "1"}),
    "qqp": (["QQP.tsv"], {"0", "1"}),
    "stsb": (["STS-B.tsv"], None),
    "mnli": (["MNLI-m.tsv", "MNLI-mm.tsv", "AX.tsv"], {"entailment", "neutral", "contradiction"}),
    "qnli": (["QNLI.tsv"], {"entailment", "not_entailment"}),
    "rte": (["RTE.tsv"], {"entailment", "not_entailment"}),
    "wnli": (["WNLI.tsv"], {"0", "1"}),
}


def classifier(num_labels: int, layers: int = 1, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


def quiet_trainer(tmp_path: Path, **kwargs: object) -> L.Trainer:
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


def read_submission(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


@pytest.mark.parametrize("task", list(SUBMISSION))
def test_predict_writes_the_glue_submission_files(task: str, glue_dir: Path, tmp_path: Path) -> None:
    data = GLUEDataModule(
        task, TOKENIZER, data_dir=str(glue_dir), max_length=32, batch_size=4, eval_batch_size=3
    )
    model = classifier(data.num_labels)
    module = FineTuningModule(model, task)
    writer = GLUESubmissionWriter(str(tmp_path / "submission"))
    quiet_trainer(tmp_path, callbacks=[writer]).predict(module, data, return_predictions=False)
    files, labels = SUBMISSION[task]
    assert sorted(p.name for p in (tmp_path / "submission").iterdir()) == sorted(files)
    data.setup("predict")
    for name, split in zip(files, data.predict_names, strict=True):
        rows = read_submission(tmp_path / "submission" / name)
        assert list(rows[0]) == ["index", "prediction"]
        # the file's own indices (from 1000, in steps of 3), not row positions
        assert [int(r["index"]) for r in rows] == [
            submission_index(i) for i in range(len(data.datasets[split]))
        ]
        if labels is None:
            assert all(0.0 <= float(r["prediction"]) <= 5.0 for r in rows)
        else:
            assert {r["prediction"] for r in rows} <= labels
        # the row of example 2 is what the model says about example 2's text
        example = data.collate([data.datasets[split][2]])
        with torch.no_grad():
            logits = model(
                **{k: example[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
            ).logits
        expected = (
            f"{float(logits.clamp(0, 5)):.3f}" if labels is None else data.task.labels[int(logits.argmax())]
        )
        assert rows[2]["prediction"] == expected


def test_distillation_predicts_with_the_student_and_tests_on_the_dev_sets(
    glue_dir: Path, tmp_path: Path
) -> None:
    data = GLUEDataModule("mnli", TOKENIZER, data_dir=str(glue_dir / "MNLI"), max_length=32, batch_size=8)
    module = DistillationModule(
        classifier(3, layers=2), {"init": "layers", "num_layers": 1}, objective=[{"term": "logits"}]
    )
    writer = GLUESubmissionWriter(str(tmp_path / "out"))
    trainer = quiet_trainer(tmp_path, callbacks=[writer])
    (results,) = [trainer.test(module, data, verbose=False)]
    keys = {key for result in results for key in result}
    for split in ("validation_matched", "validation_mismatched"):
        assert {
            f"test/mnli/{split}/accuracy",
            f"test/teacher/mnli/{split}/accuracy",
            f"test/gap/mnli/{split}/accuracy",
            f"test/loss/{split}",
        } <= keys
    predictions = trainer.predict(module, data)
    assert [p.name for p in writer.written] == ["MNLI-m.tsv", "MNLI-mm.tsv", "AX.tsv"]
    ax = read_submission(tmp_path / "out" / "AX.tsv")
    assert len(ax) == 13  # the diagnostic file next to the MNLI folder (glue_data/diagnostic)
    student = module.student.eval()
    first = predictions[0][0]
    batch = data.collate(data.datasets["test_matched"][:8])
    with torch.no_grad():
        logits = student(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
    assert torch.allclose(first["logits"], logits, atol=1e-5) and torch.equal(first["idx"], batch["idx"])


def test_missing_test_files_are_named(glue_dir: Path, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(glue_dir / "MNLI", tmp_path / "MNLI")
    with pytest.raises(DataSourceError, match=r"no AX diagnostic file.*with_ax=False"):
        GLUEDataModule("mnli", TOKENIZER, data_dir=str(tmp_path / "MNLI")).setup("predict")
    without = GLUEDataModule("mnli", TOKENIZER, data_dir=str(tmp_path / "MNLI"), with_ax=False)
    without.setup("predict")
    assert without.predict_names == ["test_matched", "test_mismatched"]
    (tmp_path / "MNLI" / "test_matched.tsv").unlink()
    with pytest.raises(DataSourceError, match="test_matched.tsv: no such file"):
        GLUEDataModule("mnli", TOKENIZER, data_dir=str(tmp_path / "MNLI"), with_ax=False).setup("predict")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train.tsv").write_text("sentence\tlabel\n")
    (tmp_path / "bad" / "test.tsv").write_text("sentence\nfoo\n")
    with pytest.raises(DataSourceError, match="lacks"):
        GLUEDataModule("sst2", TOKENIZER, data_dir=str(tmp_path / "bad")).setup("predict")


def test_hub_test_splits_and_ax_read_from_local_parquet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub path, with local parquet files standing in for nyu-mll/glue (its test labels are -1)."""
    import datasets

    from lightning_kd.datamodules import glue

    files = {}
    for config, split, columns in [
        ("mnli", "test_matched", ("premise", "hypothesis")),
        ("mnli", "test_mismatched", ("premise", "hypothesis")),
        ("ax", "test", ("premise", "hypothesis")),
    ]:
        n = 5 if config == "mnli" else 7
        table = {c: [f"{config} {split} {c} {i}" for i in range(n)] for c in columns}
        table.update(label=[-1] * n, idx=list(range(100, 100 + n)))
        files[(config, split)] = tmp_path / f"{config}-{split}.parquet"
        datasets.Dataset.from_dict(table).to_parquet(str(files[(config, split)]))
    asked = []

    def local_hub(
        name: str, config: str | None = None, split: str | None = None, streaming: bool = False
    ) -> object:
        asked.append((name, config, split))
        return datasets.load_dataset("parquet", data_files=str(files[(config, split)]), split="train")

    monkeypatch.setattr(glue, "load_hub_dataset", local_hub)
    data = GLUEDataModule("mnli", TOKENIZER)
    assert data.read_predict_split("ax")[0] == (("ax test premise 0", "ax test hypothesis 0"), 100)
    data.setup("predict")
    assert [len(data.datasets[s]) for s in data.predict_names] == [5, 5, 7]
    assert asked == [
        ("nyu-mll/glue", "ax", "test"),
        ("nyu-mll/glue", "mnli", "test_matched"),
        ("nyu-mll/glue", "mnli", "test_mismatched"),
        ("nyu-mll/glue", "ax", "test"),
    ]
    batch = next(iter(data.predict_dataloader()[2]))
    assert batch["idx"].tolist() == list(range(100, 107)) and "labels" not in batch


def test_cli_test_and_predict_on_the_offline_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`lightning-kd test` and `lightning-kd predict` on a fine-tuning recipe: metrics, then the submission folder."""
    from lightning_kd.cli import main

    monkeypatch.delenv("WANDB_MODE", raising=False)
    model = tmp_path / "model"
    classifier(6).save_pretrained(model)
    recipe = {
        "seed_everything": 0,
        "model": {
            "class_path": "lightning_kd.FineTuningModule",
            "init_args": {"model": str(model), "task": "docstrings"},
        },
        "data": {
            "class_path": "lightning_kd.GLUEDataModule",
            "init_args": {
                "task": "docstrings",
                "tokenizer": TOKENIZER,
                "max_length": 32,
                "eval_batch_size": 64,
            },
        },
        "trainer": {
            "accelerator": "cpu",
            "default_root_dir": str(tmp_path / "run"),
            "logger": False,
            "enable_progress_bar": False,
        },
    }
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe))
    main(["test", "--config", str(config), "--trainer.limit_test_batches=1", "--ckpt_path", "none"])
    main(["predict", "--config", str(config), "--ckpt_path", "none"])
    rows = read_submission(tmp_path / "run" / "glue_submission" / "docstrings.tsv")
    data = GLUEDataModule("docstrings", TOKENIZER)
    assert len(rows) == len(data.read_predict_split("test")) == len(data.read_split("validation"))
    assert {r["prediction"] for r in rows} <= set(data.task.labels)


@pytest.mark.slow
def test_ddp_predict_gathers_every_row_once_on_rank_zero(tmp_path: Path) -> None:
    """Two gloo ranks, MNLI test sets of 7 rows (AX: 10): Lightning's predict sampler gives the ranks 4 and 3
    rows; torch's DistributedSampler gives both 4, one repeated. Either way the files equal one process's."""
    glue_dir = tmp_path / "glue"
    write_glue_task(glue_dir, "MNLI")
    write_glue_test_files(glue_dir, "MNLI", count=7)
    run_ranks_script(DDP_SCRIPT, tmp_path, str(glue_dir), str(tmp_path / "ddp"))

    data = GLUEDataModule(
        "mnli", TOKENIZER, data_dir=str(glue_dir / "MNLI"), max_length=32, eval_batch_size=2
    )
    writer = GLUESubmissionWriter(str(tmp_path / "single"))
    trainer = quiet_trainer(tmp_path, callbacks=[writer])
    trainer.predict(
        FineTuningModule(ddp_glue_predict_run.classifier(), "mnli"), data, return_predictions=False
    )
    names = ["MNLI-m.tsv", "MNLI-mm.tsv", "AX.tsv"]
    single = {name: (tmp_path / "single" / name).read_text() for name in names}
    assert [len(text.splitlines()) - 1 for text in single.values()] == [7, 7, 10]
    # rows of more than one class: a row written under another's index would change the file
    assert all(len({line.split("\t")[1] for line in text.splitlines()[1:]}) > 1 for text in single.values())
    assert [int(r["index"]) for r in read_submission(tmp_path / "single" / "AX.tsv")] == [
        submission_index(i) for i in range(10)
    ]

    shares = {
        kind: [json.loads((tmp_path / "ddp" / f"{kind}-rank{r}.json").read_text()) for r in (0, 1)]
        for kind in ("lightning", "repeated")
    }
    assert shares["lightning"] == [{"0": 4, "1": 4, "2": 5}, {"0": 3, "1": 3, "2": 5}]
    assert shares["repeated"] == [{"0": 4, "1": 4, "2": 5}, {"0": 4, "1": 4, "2": 5}]
    for kind in ("lightning", "repeated"):
        assert sorted(p.name for p in (tmp_path / "ddp" / kind).iterdir()) == sorted(names)
        for name in names:
            assert (tmp_path / "ddp" / kind / name).read_text() == single[name], (kind, name)


def test_a_test_set_smaller_than_the_world_is_refused_naming_it(tmp_path: Path) -> None:
    """Lightning's predict sampler fails on a rank left without a row with a bare AssertionError; the DataModule
    names the set and the device count that would work before any rank starts predicting."""
    glue_dir = tmp_path / "glue"
    write_glue_task(glue_dir, "MNLI")
    write_glue_test_files(glue_dir, "MNLI", count=7)
    mismatched = glue_dir / "MNLI" / "test_mismatched.tsv"
    mismatched.write_text("".join(mismatched.read_text().splitlines(keepends=True)[:2]))  # header + 1 row
    data = GLUEDataModule("mnli", TOKENIZER, data_dir=str(glue_dir / "MNLI"), max_length=32)
    data.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    assert len(data.predict_dataloader()) == 3  # one device: every set has a row for it
    data.trainer.strategy.world_size = 2  # what a 2-process run reports, without starting one
    with pytest.raises(ValueError, match=r"test_mismatched test set has 1 rows.*at most 1 devices"):
        data.predict_dataloader()
