"""Resuming with values that differ from the checkpoint's is refused with the list, or applied on purpose with a
warning; the same in Python and in the CLI. A checkpoint that cannot be read is named."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from kd_helpers import FixedBatches, StopAt, quiet_trainer, tiny_bert_config
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import BertForMaskedLM

from lightning_kd import DistillationModule
from lightning_kd.cli import main
from lightning_kd.training.checkpoints import AtomicCheckpointIO


class Rates(L.Callback):
    """The optimizer's settings at the first step the run takes."""

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if hasattr(self, "base"):
            return
        group = trainer.optimizers[0].param_groups[0]
        self.base, self.current, self.decay = group["initial_lr"], group["lr"], group["weight_decay"]


def distil(
    teacher: BertForMaskedLM,
    tmp_path: Path,
    steps: int,
    ckpt_path: str | None = None,
    stop: int | None = None,
    **options: object,
) -> tuple[DistillationModule, Rates]:
    torch.manual_seed(0)
    module = DistillationModule(
        teacher,
        {"init": "layers", "num_layers": 2},
        objective=[{"term": "hidden"}],
        learning_rate=options.pop("learning_rate", 1e-3),
        warmup_steps=2,
        **options,
    )
    rates = Rates()
    trainer = quiet_trainer(
        max_steps=steps,
        enable_checkpointing=True,
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path, save_last=True),
            rates,
            *([StopAt(stop)] if stop else []),
        ],
    )
    trainer.fit(module, FixedBatches(), ckpt_path=ckpt_path)
    return module, rates


def test_python_resume_with_other_values_is_refused_with_the_list(
    teacher: BertForMaskedLM, tmp_path: Path
) -> None:
    teacher.config._name_or_path = "teacher-a"
    distil(teacher, tmp_path, steps=3)
    with pytest.raises(
        ValueError,
        match=r"learning_rate: checkpoint 0\.001, now 0\.01; weight_decay: checkpoint "
        r"0\.01, now 0\.1\. .*allow_changes=\[learning_rate, weight_decay\]",
    ):
        distil(
            teacher,
            tmp_path,
            steps=6,
            ckpt_path=str(tmp_path / "last.ckpt"),
            learning_rate=1e-2,
            weight_decay=0.1,
        )
    other = BertForMaskedLM(tiny_bert_config())
    other.config._name_or_path = "another-teacher"
    with pytest.raises(
        ValueError, match="distilled from teacher 'teacher-a', but the module now holds 'another-teacher'"
    ):
        distil(other, tmp_path, steps=6, ckpt_path=str(tmp_path / "last.ckpt"))


def test_python_resume_with_allowed_changes_applies_them(teacher: BertForMaskedLM, tmp_path: Path) -> None:
    distil(teacher, tmp_path, steps=6, stop=3)
    with pytest.warns(
        UserWarning, match="resuming with learning_rate=0.01 instead of the checkpoint's 0.001"
    ):
        _, after = distil(
            teacher,
            tmp_path,
            steps=6,
            ckpt_path=str(tmp_path / "last.ckpt"),
            learning_rate=1e-2,
            weight_decay=0.1,
            allow_changes=["learning_rate", "weight_decay"],
        )
    # the restored optimizer state carries the new values, at the schedule's position: the first resumed step
    # (step 4 of 6, warm-up 2, linear decay) runs at 1e-2 * (6 - 3) / (6 - 2)
    assert after.base == pytest.approx(1e-2) and after.decay == pytest.approx(0.1)
    assert after.current == pytest.approx(1e-2 * 3 / 4)


def test_unchanged_resume_is_silent(
    teacher: BertForMaskedLM, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    distil(teacher, tmp_path, steps=2)
    distil(teacher, tmp_path, steps=3, ckpt_path=str(tmp_path / "last.ckpt"))
    assert not [w for w in recwarn if "resuming with" in str(w.message)]


def recipe(tmp_path: Path, teacher_dir: Path, steps: int) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": steps,
            "enable_progress_bar": False,
            "logger": False,
            "default_root_dir": str(tmp_path / "run"),
            "enable_model_summary": False,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True},
                }
            ],
        },
        "model": {
            "class_path": "lightning_kd.DistillationModule",
            "init_args": {
                "teacher": str(teacher_dir),
                "student": {"init": "layers", "num_layers": 2},
                "task": "masked-lm",
                "objective": [{"term": "hidden"}],
                "learning_rate": 1e-3,
            },
        },
        "data": {"class_path": "kd_helpers.FixedBatches"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_resume_uses_the_command_line_and_refuses_silent_changes(
    teacher: BertForMaskedLM, tmp_path: Path
) -> None:
    teacher.save_pretrained(tmp_path / "teacher")
    config = recipe(tmp_path, tmp_path / "teacher", steps=2)
    main(["fit", "--config", str(config)])
    last = str(tmp_path / "ckpt" / "last.ckpt")
    resume = ["fit", "--config", str(config), "--trainer.max_steps", "3", "--ckpt_path", last]
    with pytest.raises(ValueError, match="learning_rate: checkpoint 0.001, now 0.02"):
        main([*resume, "--model.init_args.learning_rate", "0.02"])
    with pytest.warns(UserWarning, match="resuming with learning_rate=0.02"):
        main(
            [
                *resume,
                "--model.init_args.learning_rate",
                "0.02",
                "--model.init_args.allow_changes",
                "[learning_rate]",
            ]
        )
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == 3
    assert state["optimizer_states"][0]["param_groups"][0]["initial_lr"] == pytest.approx(0.02)


def test_truncated_checkpoint_is_named(teacher: BertForMaskedLM, tmp_path: Path) -> None:
    distil(teacher, tmp_path, steps=2)
    whole = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(RuntimeError, match="checkpoint .*cut.ckpt cannot be read .* truncated"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "cut.ckpt")
    teacher.save_pretrained(tmp_path / "teacher")
    config = recipe(tmp_path, tmp_path / "teacher", steps=3)
    with pytest.raises(RuntimeError, match="cut.ckpt cannot be read"):
        main(["fit", "--config", str(config), "--ckpt_path", str(tmp_path / "cut.ckpt")])
    with pytest.raises(FileNotFoundError, match="checkpoint .*nowhere.ckpt does not exist"):
        main(["fit", "--config", str(config), "--ckpt_path", str(tmp_path / "nowhere.ckpt")])


def test_load_from_checkpoint_takes_overrides_as_given(teacher: BertForMaskedLM, tmp_path: Path) -> None:
    teacher.config._name_or_path = "teacher-a"
    distil(teacher, tmp_path, steps=2)
    other = BertForMaskedLM(tiny_bert_config())
    other.config._name_or_path = "another-teacher"
    # an explicit override outside a fit (inference, evaluation) is what the caller asked for
    loaded = DistillationModule.load_from_checkpoint(
        tmp_path / "last.ckpt", teacher=other, learning_rate=1e-2
    )
    assert loaded.teacher is other and loaded.hparams.learning_rate == 1e-2
