"""Every YAML recipe under experiments/ parses against the classes it names (types, keys, class paths)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lightning_kd.cli import main

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
RECIPES = sorted(p for p in EXPERIMENTS.rglob("*.yaml") if "trainer" in yaml.safe_load(p.read_text()))


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(EXPERIMENTS)) for p in RECIPES])
def test_recipe_parses(recipe: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("lightning_kd.")


def test_homodistil_targets_stay_counts() -> None:
    """A count in a recipe must not turn into a float, which the callback would read as a fraction."""
    from lightning_kd.callbacks.pruning import PruningCallback
    from lightning_kd.cli import DistillationCLI  # noqa: F401  (the parser the recipes go through)

    recipe = yaml.safe_load((EXPERIMENTS / "homodistil" / "homobert_small.yaml").read_text())
    target = recipe["trainer"]["callbacks"][0]["init_args"]["target"]
    assert all(isinstance(v, int) for v in target.values())
    import jsonargparse

    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(PruningCallback, "pruning")
    parsed = parser.parse_object({"pruning": {"target": target}})
    assert all(isinstance(v, int) for v in parsed.pruning.target.values())
