"""The contract between the callbacks and the modules (lightning_kd.distillation.contract): the callbacks ask
for nothing it does not list, DistillationModule provides all of it, and a module without it is refused by name."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning as L
import pytest
from kd_helpers import tiny_bert_config
from transformers import BertForSequenceClassification

import lightning_kd
from lightning_kd import DistillationModule, FineTuningModule, PruningCallback, TEDFilterCallback
from lightning_kd.distillation.contract import NEEDS, DistillationRun, require_run

PACKAGE = Path(lightning_kd.__file__).parent
CALLBACK_FILES = [
    *sorted((PACKAGE / "callbacks").glob("*.py")),
    PACKAGE / "pruning" / "callback.py",
    PACKAGE / "pruning" / "strategies.py",
    PACKAGE / "ted" / "callback.py",
]


def contract_names() -> set[str]:
    names = set(DistillationRun.__annotations__)
    names |= {n for n, v in vars(DistillationRun).items() if callable(v) and not n.startswith("_")}
    return names


def module_attributes_read(path: Path) -> set[str]:
    """``pl_module.<name>`` and ``getattr(pl_module, "<name>")`` in one file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "pl_module"
        ):
            names.add(node.attr)
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", None) in ("getattr", "hasattr")
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id == "pl_module"
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            names.add(node.args[1].value)
    return names


def test_callbacks_ask_only_for_what_the_contract_lists() -> None:
    lightning_api = {n for n in dir(L.LightningModule) if not n.startswith("_")}
    outside = {
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in CALLBACK_FILES
        for name in module_attributes_read(path) - lightning_api - contract_names()
    }
    assert not outside, f"callbacks read module attributes DistillationRun does not list: {sorted(outside)}"


def test_the_needs_of_each_callback_are_in_the_contract() -> None:
    for who, needs in NEEDS.items():
        assert set(needs) <= contract_names(), who


def test_distillation_module_provides_the_contract(teacher) -> None:
    module = DistillationModule(teacher, {"init": "layers", "num_layers": 1}, task="masked-lm")
    assert isinstance(module, DistillationRun)
    for who in NEEDS:
        require_run(module, who)


@pytest.mark.parametrize(
    "callback",
    [PruningCallback(target={"heads": 0.5}), TEDFilterCallback(stage="filters")],
    ids=["pruning", "ted"],
)
def test_a_fine_tuning_module_is_refused_by_name(callback: L.Callback, tmp_path: Path) -> None:
    model = FineTuningModule(BertForSequenceClassification(tiny_bert_config(num_labels=2)), task="sst2")
    assert not isinstance(model, DistillationRun)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.strategy.connect(model)
    with pytest.raises(
        TypeError, match=r"works on a distillation module, but FineTuningModule has no student"
    ):
        if isinstance(callback, PruningCallback):
            callback.on_fit_start(trainer, model)
        else:
            callback.setup(trainer, model, "fit")
