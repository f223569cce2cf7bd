"""The package layout's promises: cheap import, every public name and recipe class path resolves, and old module
paths from before the reorganisation keep working with the new path named."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

import lightning_kd

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "experiments").rglob("*.yaml"))


def class_paths(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["class_path"]] if isinstance(node.get("class_path"), str) else []
        return found + [p for value in node.values() for p in class_paths(value)]
    if isinstance(node, list):
        return [p for value in node for p in class_paths(value)]
    return []


def resolve(path: str) -> object:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("name", lightning_kd.__all__)
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(lightning_kd, name).__name__ == name


def test_every_shipped_recipe_class_path_resolves() -> None:
    paths = sorted({p for recipe in RECIPES for p in class_paths(yaml.safe_load(recipe.read_text()))})
    assert any(p.startswith("lightning_kd.") for p in paths)
    unresolved = []
    for path in paths:
        try:
            resolve(path)
        except (ImportError, AttributeError) as error:
            unresolved.append(f"{path}: {error}")
    assert not unresolved, "\n".join(unresolved)


@pytest.mark.parametrize("old,new", sorted(lightning_kd.MOVED_MODULES.items()))
def test_old_module_paths_keep_working_and_name_the_new_one(old: str, new: str) -> None:
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert any(new in str(w.message) and issubclass(w.category, FutureWarning) for w in caught)


def test_an_old_class_path_as_a_recipe_names_it() -> None:
    sys.modules.pop("lightning_kd.callbacks.pruning", None)
    with pytest.warns(FutureWarning, match="lightning_kd.pruning.callback"):
        cls = resolve("lightning_kd.callbacks.pruning.PruningCallback")
    assert cls is lightning_kd.PruningCallback


def test_import_is_cheap_and_the_export_modules_import_first() -> None:
    """One fresh interpreter (each costs seconds): importing the package loads no heavy library, and
    training.export, which reaches distillation through pruning (PruningCallback), imports before anything else
    of the library (it once met itself half-initialised)."""
    code = (
        "import sys, lightning_kd; heavy = [m for m in ('torch', 'lightning', 'transformers', 'matplotlib', "
        "'wandb') if m in sys.modules]; print(heavy); import lightning_kd.training.export"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_loose_modules_at_the_root() -> None:
    loose = sorted(p.name for p in (ROOT / "lightning_kd").glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= 4, loose


def test_no_library_file_over_450_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / "lightning_kd").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 450
    }
    assert not long, long


def test_library_messages_reach_a_terminal_on_stdout() -> None:
    code = "import logging, lightning_kd; logging.getLogger('lightning_kd.x').info('student saved')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "student saved\n"
    configured = "import logging; logging.basicConfig(level=logging.WARNING); " + code
    done = subprocess.run([sys.executable, "-c", configured], capture_output=True, text=True, check=True)
    assert done.stdout == "" and done.stderr == "", "an application's logging configuration decides"
