"""Every YAML recipe under experiments/ parses against the classes it names (types, keys, class paths)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from lightning_kd.cli import main

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
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
    from lightning_kd.cli.app import DistillationCLI  # noqa: F401  (the parser the recipes go through)
    from lightning_kd.pruning.callback import PruningCallback

    recipe = yaml.safe_load((EXPERIMENTS / "homodistil" / "homobert_small.yaml").read_text())
    target = recipe["trainer"]["callbacks"][0]["init_args"]["target"]
    assert all(isinstance(v, int) for v in target.values())
    import jsonargparse

    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(PruningCallback, "pruning")
    parsed = parser.parse_object({"pruning": {"target": target}})
    assert all(isinstance(v, int) for v in parsed.pruning.target.values())


# Recipes whose data and models exist on every machine (the packaged MiniLM, the docstrings corpus), in the
# order a user runs them: the TED chain reads what the run before it wrote under runs/.
OFFLINE = [
    "demo.yaml",
    "homodistil/tiny_offline.yaml",
    "glue/docstrings_minilm_tiny.yaml",
    "squad/docstrings_minilm_tiny.yaml",
    "ted/tiny_teacher.yaml",
    "ted/tiny_stage1.yaml",
    "ted/tiny_stage2.yaml",
    "ted/squad_tiny_teacher.yaml",
    "ted/squad_tiny_stage1.yaml",
    "ted/squad_tiny_stage2.yaml",
    "decoder/teacher.yaml",
    "decoder/distil_prune.yaml",
]
OFFLINE_GROUPS = [
    ["demo.yaml"],
    ["homodistil/tiny_offline.yaml"],
    ["glue/docstrings_minilm_tiny.yaml"],
    ["squad/docstrings_minilm_tiny.yaml"],
    ["ted/tiny_teacher.yaml", "ted/tiny_stage1.yaml", "ted/tiny_stage2.yaml"],
    ["ted/squad_tiny_teacher.yaml", "ted/squad_tiny_stage1.yaml", "ted/squad_tiny_stage2.yaml"],
    ["decoder/teacher.yaml", "decoder/distil_prune.yaml"],
]
# Run to their shipped length: a pruning schedule is laid out over max_steps, so a run cut short passes through
# fewer widths (12 relation heads failed at a width met only mid-run, and max_steps=2 hid it). About a minute.
FULL_LENGTH = {
    "homodistil/tiny_offline.yaml": {"hidden_size": 192, "num_attention_heads": 6, "intermediate_size": 768},
    # the decoder demo's teacher is trained in the suite as a user trains it (about 40 s), so its student distils
    # the teacher the recipe's comments describe
    "decoder/teacher.yaml": {"hidden_size": 64, "num_key_value_heads": 2, "intermediate_size": 256},
    "decoder/distil_prune.yaml": {
        "hidden_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 128,
    },
}
# Groups of models so small that one thread runs them several times faster than two threads contending with
# whatever else runs on a 2-core machine.
ONE_THREAD = {"decoder/teacher.yaml"}


def test_every_recipe_is_either_run_offline_or_paper_scale() -> None:
    """A recipe on data every machine has (the docstrings, GLUE- or SQuAD-shaped) must be in OFFLINE, so it is
    run as shipped below; the others (hub teachers and downloads) are parsed above."""
    for recipe in RECIPES:
        name = str(recipe.relative_to(EXPERIMENTS))
        data = yaml.safe_load(recipe.read_text())["data"]["init_args"]
        sources = [s if isinstance(s, str) else s.get("name") for s in data.get("sources") or []]
        offline = (
            data.get("task") == "docstrings"
            or data.get("data_dir") == "docstrings"
            or "docstrings" in sources
        )
        assert (name in OFFLINE) == offline, f"{name}: add it to OFFLINE, which the suite runs as shipped"


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The folder where the offline group ending with a recipe ran, run once for the module: the SQuAD predict
    test reads the checkpoint its group's fit left, so the same fit serves both tests."""
    done: dict[str, Path] = {}

    def run(last: str) -> Path:
        if last not in done:
            (group,) = [g for g in OFFLINE_GROUPS if g[-1] == last]
            root = tmp_path_factory.mktemp(Path(last).stem)
            with pytest.MonkeyPatch.context() as patch:
                patch.chdir(root)
                patch.delenv("WANDB_MODE", raising=False)
                threads = torch.get_num_threads()
                if group[0] in ONE_THREAD:
                    torch.set_num_threads(1)
                try:
                    _fit_group(group)
                finally:
                    torch.set_num_threads(threads)
            done[last] = root
        return done[last]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("group", OFFLINE_GROUPS, ids=[g[-1] for g in OFFLINE_GROUPS])
def test_offline_recipes_run_as_shipped(group: list[str], offline_run: Callable[[str], Path]) -> None:
    """Each offline recipe, unmodified but for max_steps (pruning recipes not even that), through the CLI in a
    fresh folder (its runs/ paths are relative): a setting that only breaks at full length (an interval longer
    than an epoch) fails here too."""
    root = offline_run(group[-1])
    for name in group:
        _check_exports(name, root)
    for name in group:
        if name in AFTER_RUN:
            AFTER_RUN[name](root)


def _fit_group(group: list[str]) -> None:
    for name in group:
        main(
            [
                "fit",
                "--config",
                str(EXPERIMENTS / name),
                *([] if name in FULL_LENGTH else ["--trainer.max_steps=2"]),
            ]
        )


def _check_exports(name: str, root: Path) -> None:
    recipe = yaml.safe_load((EXPERIMENTS / name).read_text())
    parts = [recipe["model"]] + recipe["trainer"].get("callbacks", [])
    exports = [p["init_args"]["export_dir"] for p in parts if (p.get("init_args") or {}).get("export_dir")]
    for folder in exports:
        assert (root / folder / "config.json").is_file(), f"{name} did not export {folder}"
        assert name in (root / folder / "README.md").read_text(), "the model card names its recipe"
        if name in FULL_LENGTH:
            config = json.loads((root / folder / "config.json").read_text())
            assert {key: config[key] for key in FULL_LENGTH[name]} == FULL_LENGTH[name], "ends at its target"


def _decoder_student_generates_and_its_perplexity_is_logged(root: Path) -> None:
    """The pruned decoder loads with plain transformers, generates with its own tokenizer, and is the model whose
    perplexity the last validation logged (recomputed from the folder on the same held-out text)."""
    import csv
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_kd import PretrainingDataModule

    folder = root / "runs" / "decoder" / "student"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer("Return the", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 8)
    assert tokenizer.decode(out[0]).startswith("Return the")
    assert "AutoModelForCausalLM.from_pretrained" in (folder / "README.md").read_text()
    rows = list(csv.DictReader((root / "runs/decoder/distil_run/csv/version_0/metrics.csv").open()))
    last = [r for r in rows if r.get("val/perplexity/gap")][-1]
    student, teacher = float(last["val/perplexity/student"]), float(last["val/perplexity/teacher"])
    assert float(last["val/perplexity/gap"]) == pytest.approx(student - teacher, rel=1e-4)
    # the teacher learned the docstrings: the token frequencies alone give a perplexity of about 390
    assert teacher < 250 and student > teacher
    held_out = PretrainingDataModule(
        str(folder),
        sources=["docstrings"],
        val_sources=[{"name": "docstrings", "split": "validation"}],
        lm="causal",
        max_length=64,
        batch_size=16,
    )
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for batch in held_out.val_dataloader():
            count = int((batch["labels"][:, 1:] != -100).sum())
            nll += model(**batch).loss.item() * count
            tokens += count
    assert math.exp(nll / tokens) == pytest.approx(student, rel=1e-3)


AFTER_RUN = {"decoder/distil_prune.yaml": _decoder_student_generates_and_its_perplexity_is_logged}


PAPER_SCALE = [p for p in RECIPES if str(p.relative_to(EXPERIMENTS)) not in OFFLINE]


def _stand_in(loader: object, name_or_path: object, what: str, **kwargs: object) -> object:
    """A tiny model of the family a hub name or TED teacher folder names, built offline instead of loading it."""
    from transformers import (
        AutoModel,
        BertConfig,
        DebertaV2Config,
        LlamaConfig,
        ModernBertConfig,
        Qwen2Config,
    )

    if what != "model" and what != "model config":
        raise AssertionError(f"instantiating a recipe should not load a {what}")
    labels = {k: kwargs[k] for k in ("num_labels", "problem_type") if kwargs.get(k) is not None}
    shape = dict(
        hidden_size=48,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=96,
        max_position_embeddings=128,
        vocab_size=30522,
        **labels,
    )
    name = str(name_or_path)
    if "modernbert" in name.lower():  # its vocabulary holds its special tokens (pad 50283)
        config = ModernBertConfig(**{**shape, "vocab_size": 50368})
    elif "llama" in name.lower() or "qwen" in name.lower():  # decoders: 4 key/value groups of 3 query heads
        decoder = LlamaConfig if "llama" in name.lower() else Qwen2Config
        config = decoder(**shape, num_key_value_heads=4, head_dim=8)
    elif "deberta" in name or "ted" in name:
        config = DebertaV2Config(**shape)
    else:
        config = BertConfig(**shape)
    if what == "model config":
        return config
    return (AutoModel if loader is None else loader).from_config(config)


@pytest.mark.parametrize("recipe", PAPER_SCALE, ids=[str(p.relative_to(EXPERIMENTS)) for p in PAPER_SCALE])
def test_paper_scale_recipe_instantiates(recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Model, data, trainer and callbacks built from the recipe, with tiny stand-ins for its hub models (nothing
    downloads), this machine's hardware, and the docstrings for prepared shards it does not have: arguments every
    class accepts, not only a config that parses."""
    from lightning_kd import hub
    from lightning_kd.cli.app import DistillationCLI

    monkeypatch.setattr(hub, "_load", _stand_in)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    # the hardware is this machine's (a multi-node GPU recipe cannot build its Trainer on a CPU), the rest as shipped
    hardware = [
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.num_nodes=1",
        "--trainer.strategy=auto",
    ]
    # prepared shards are checked when the DataModule is built; this machine has none, so the docstrings stand in
    data = yaml.safe_load(recipe.read_text())["data"]["init_args"]
    if data.get("prepared"):
        hardware += ["--data.init_args.prepared=null", "--data.init_args.sources=[docstrings]"]
    cli = DistillationCLI(args=["--config", str(recipe), *hardware], run=False)
    assert cli.model.__class__.__module__.startswith("lightning_kd.")
    assert cli.datamodule.__class__.__module__.startswith("lightning_kd.")
    recipe_callbacks = yaml.safe_load(recipe.read_text())["trainer"].get("callbacks", [])
    built = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {c["class_path"].rsplit(".", 1)[-1] for c in recipe_callbacks} <= built


@pytest.mark.slow
def test_squad_predict_writes_the_official_scripts_files(
    offline_run: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``lightning-kd predict`` on the offline SQuAD 2.0 recipe, from the checkpoint its fit left (the offline
    run's, ``--trainer.max_steps=2``), writes predictions.json and null_odds.json for every dev question, as the
    recipe's header says."""
    root = offline_run("squad/docstrings_minilm_tiny.yaml")
    monkeypatch.chdir(root)
    recipe = str(EXPERIMENTS / "squad" / "docstrings_minilm_tiny.yaml")
    main(["predict", "--config", recipe, "--ckpt_path", "last"])
    folder = root / "runs" / "squad_tiny" / "squad_predictions"
    answers = json.loads((folder / "predictions.json").read_text())
    odds = json.loads((folder / "null_odds.json").read_text())
    from lightning_kd.datamodules.squad_docstrings import write_docstring_squad

    dev = json.loads((write_docstring_squad("v2.0") / "dev-v2.0.json").read_text())
    ids = {
        qa["id"] for article in dev["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]
    }
    assert set(answers) == set(odds) == ids and all(isinstance(a, str) for a in answers.values())


def test_the_modernbert_recipe_target_keeps_heads_whole_at_the_size_it_states() -> None:
    """Checked on ModernBERT-base's real shape (built on the meta device, nothing downloads): the target can be
    exported, and the student has the 47.1M parameters the recipe's comment states."""
    import torch
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    from lightning_kd.pruning.export import check_exportable

    recipe = yaml.safe_load((EXPERIMENTS / "modernbert" / "homodistil_base.yaml").read_text())
    target = recipe["trainer"]["callbacks"][0]["init_args"]["target"]
    base = dict(hidden_size=768, num_attention_heads=12, intermediate_size=1152, num_hidden_layers=22)
    with torch.device("meta"):
        teacher = ModernBertForMaskedLM(ModernBertConfig(**base))
        check_exportable(teacher, target["hidden"], target["heads"])
        with pytest.raises(ValueError, match="multiple of 64"):
            check_exportable(teacher, target["hidden"] + 32, target["heads"])
        shape = dict(hidden_size=target["hidden"], num_attention_heads=target["heads"])
        student = ModernBertForMaskedLM(
            ModernBertConfig(**{**base, **shape, "intermediate_size": target["ffn"]})
        )
    assert sum(p.numel() for p in teacher.parameters()) == 149_655_232  # ModernBERT-base's published 149M
    assert round(sum(p.numel() for p in student.parameters()) / 1e6, 1) == 47.1


DECODERS = {  # the published shapes (config.json of each hub model), built on the meta device
    "llama32_1b_homodistil.yaml": (
        "LlamaForCausalLM",
        dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16),
        dict(num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
        (1.236, 0.776),
    ),
    "qwen25_1p5b_homodistil.yaml": (
        "Qwen2ForCausalLM",
        dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28),
        dict(num_attention_heads=12, num_key_value_heads=2, head_dim=128, tie_word_embeddings=True),
        (1.544, 0.721),
    ),
}


@pytest.mark.parametrize("name", list(DECODERS))
def test_the_decoder_recipes_shrink_to_the_size_they_state(name: str) -> None:
    """The target on the real shape gives the billions of parameters the comment states, with every key/value
    group kept (the config an export of that student writes: the head size is stored, so it stays)."""
    import torch
    import transformers

    class_name, shape, attention, (teacher_size, student_size) = DECODERS[name]
    recipe = yaml.safe_load((EXPERIMENTS / "decoder" / name).read_text())
    target = recipe["trainer"]["callbacks"][0]["init_args"]["target"]
    assert set(target) == {"hidden", "ffn"}  # heads are not a target: a unit is a whole key/value group
    model_class = getattr(transformers, class_name)
    config_class = getattr(transformers, class_name.replace("ForCausalLM", "Config"))
    narrowed = {**shape, "hidden_size": target["hidden"], "intermediate_size": target["ffn"]}
    with torch.device("meta"):
        models = [model_class(config_class(**s, **attention)) for s in (shape, narrowed)]
    billions = [round(sum(p.numel() for p in m.parameters()) / 1e9, 3) for m in models]
    assert billions == [teacher_size, student_size]
