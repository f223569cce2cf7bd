"""Every private attribute lightning_kd.training.lightning_internals reads exists in the installed Lightning and
torch, and answers as the library expects: an upgrade that moves one fails here, by name."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

from lightning_kd.training import lightning_internals as internals

PACKAGE = Path(internals.__file__).resolve().parents[1]
PRIVATE = (
    "_logger_connector",
    "_should_accumulate",
    "_accelerator_connector",
    "_wandb_init",
    "_experiment",
    "_register_ddp_comm_hook",
    "_ddp_comm_state",
    "_ddp_comm_hook",
    "_ddp_comm_wrapper",
    "_found_inf_per_device",
    "_trainer",
    "_data_source",
    "_version",
    "_checkpoint_connector",
    "_parse_ckpt_path",
    "_data_parallel_size",
    "_tensor_parallel_size",
    "_METADATA_FILENAME",
    "_get_fsdp_state",
    "_pre_forward",
    "_post_forward",
    "_training_state",
    "compute_local_shape_and_global_offset",
)


def owners() -> dict[str, object]:
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    return {
        "Trainer": trainer,
        "LightningModule": L.LightningModule(),
        "WandbLogger": WandbLogger(offline=True, save_dir="unused"),
        "CSVLogger": CSVLogger("unused"),
        "DDPStrategy": DDPStrategy(),
        "GradScaler": torch.amp.GradScaler("cpu"),
        "ModelParallelStrategy": ModelParallelStrategy(),
        "FSDPState": FSDPState(),
    }


@pytest.mark.parametrize("owner,path", internals.RELIED_ON, ids=[f"{o}.{p}" for o, p in internals.RELIED_ON])
def test_every_private_attribute_relied_on_exists(owner: str, path: str) -> None:
    objects = owners()
    value = objects[owner]
    for name in path.split("."):
        assert hasattr(value, name), (
            f"{owner}.{path} is gone from this Lightning/torch: update lightning_internals"
        )
        value = getattr(value, name)


def test_the_answers_on_a_real_trainer() -> None:
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    assert isinstance(internals.logs_this_step(trainer), bool)
    assert internals.accumulating(trainer) in (True, False)
    assert internals.cluster_environment(trainer) is not None
    module = L.LightningModule()
    assert internals.attached_trainer(module) is None
    module.trainer = trainer
    assert internals.attached_trainer(module) is trainer
    logger = WandbLogger(offline=True, save_dir="unused", name="x")
    assert not internals.wandb_run_started(logger)
    assert internals.wandb_init_kwargs(logger)["name"] == "x"


def test_a_missing_attribute_is_named_in_our_words() -> None:
    with pytest.raises(RuntimeError, match=r"object\._logger_connector\.should_update_logs.*does not have"):
        internals.logs_this_step(object())


def test_no_other_library_file_reads_lightning_private_attributes() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "lightning_internals.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else None
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in (
                "getattr",
                "hasattr",
                "setattr",
            ):
                name = next((a.value for a in node.args[1:2] if isinstance(a, ast.Constant)), None)
            if isinstance(node, ast.ImportFrom):
                name = next((a.name for a in node.names if a.name in PRIVATE), None)
            if name in PRIVATE:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {name}")
    assert not offenders, "Lightning internals read outside lightning_internals.py:\n" + "\n".join(offenders)
