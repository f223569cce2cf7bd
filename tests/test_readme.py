"""Every Python snippet of README.md, run as written: hub names stand for local tiny models, and training stops
after a few steps by a callback the test adds, so each run keeps the schedule its snippet sets."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import lightning
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

from lightning_kd import hub
from lightning_kd.datamodules import sources

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the a one two of and to in is was for on with as by at from it this that student teacher model layer head "
    "neuron width prune distil learn step small large fast slow quiet brown fox jumps over lazy dog river"
).split()
STEPS = 2  # training steps each snippet's fit runs before the added callback stops it


def python_snippets(text: str) -> list[tuple[str, str]]:
    """The ```python blocks of a Markdown text, each with the heading it sits under."""
    found, heading = [], ""
    for part in re.split(r"(^```python\n.*?^```)", text, flags=re.S | re.M):
        if part.startswith("```python"):
            found.append((heading, part[len("```python\n") : -3]))
        else:
            headings = re.findall(r"^#+ (.+)$", part, flags=re.M)
            heading = headings[-1] if headings else heading
    return found


def write_model(folder: Path, **shape: int) -> Path:
    """A BERT masked LM of ``shape`` over a few dozen words, saved with its tokenizer as a hub repo holds them."""
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    BertTokenizerFast(vocab=vocab, do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), max_position_embeddings=128, **shape)
    BertForMaskedLM(config).save_pretrained(folder)
    return folder


# What each snippet's hub names stand for, by the README heading it sits under. The Quick start student takes
# six of the teacher's blocks, so its stand-in has twelve; HomoDistil's targets are counts (256 hidden, 4 heads,
# 1024 neurons), so its stand-in is wider than those and one block deep. Snippets run in order in one scope, as
# a reader runs them (the second reuses the first's `data`).
MODELS: dict[str, dict[str, dict[str, int]]] = {
    "Quick start": {
        "bert-base-uncased": dict(
            hidden_size=32, num_hidden_layers=12, num_attention_heads=4, intermediate_size=64
        ),
    },
    "HomoDistil: prune while distilling": {
        "bert-base-uncased": dict(
            hidden_size=320, num_hidden_layers=1, num_attention_heads=5, intermediate_size=1280
        ),
    },
}
# The hub datasets the snippets stream: each stands for a small local parquet file of its text column.
DATASETS = {("wikimedia/wikipedia", "20231101.en", "train"), ("bookcorpus/bookcorpus", None, "train")}


class StopAfter(lightning.Callback):
    """Ends fit after ``steps`` optimizer steps, leaving max_steps (and so every schedule) as the snippet set it."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer: lightning.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


def stopping_trainer(trainers: list[lightning.Trainer]) -> type[lightning.Trainer]:
    class Trainer(lightning.Trainer):
        def __init__(self, *args: Any, callbacks: list | None = None, **kwargs: Any) -> None:
            kwargs.setdefault("enable_progress_bar", False)
            super().__init__(*args, callbacks=[*(callbacks or []), StopAfter(STEPS)], **kwargs)
            trainers.append(self)

    return Trainer


def local_hub(tmp_path: Path, asked: list[str]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Loaders of models, tokenizers and datasets that serve only the stand-ins and fail on any other name."""
    folders = {
        (heading, name): write_model(tmp_path / "hub" / f"{i}-{j}", **shape)
        for i, (heading, names) in enumerate(MODELS.items())
        for j, (name, shape) in enumerate(names.items())
    }
    corpus = tmp_path / "hub" / "corpus.parquet"
    text = [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(8 + i % 17)) for i in range(64)]
    datasets.Dataset.from_dict({"text": text}).to_parquet(str(corpus))

    def load(loader: Any, name: object, what: str, **kwargs: Any) -> Any:
        heading = asked[-1]
        if Path(name).is_dir():  # a folder a stand-in was loaded from, named again (the teacher's tokenizer)
            return loader.from_pretrained(name, **kwargs)
        if (heading, str(name)) not in folders:
            raise AssertionError(
                f"the README snippet under {heading!r} loads the {what} {name!r}, which has no stand-in: "
                "add it to MODELS in tests/test_readme.py"
            )
        return loader.from_pretrained(folders[(heading, str(name))], **kwargs)

    def load_dataset(name: str, config: str | None = None, split: str | None = None, **kwargs: Any) -> Any:
        if (name, config, split) not in DATASETS:
            raise AssertionError(
                f"a README snippet streams the hub dataset {(name, config, split)}, which has no stand-in: "
                "add it to DATASETS in tests/test_readme.py"
            )
        return datasets.load_dataset("parquet", data_files=str(corpus), split="train", streaming=True)

    return load, load_dataset


def test_every_python_snippet_of_the_readme_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snippets = python_snippets((ROOT / "README.md").read_text(encoding="utf-8"))
    headings = [heading for heading, _ in snippets]
    # A new snippet fails here until it has its stand-ins: none is skipped silently.
    assert headings == list(MODELS), (
        f"README.md's Python snippets sit under {headings}; MODELS covers {list(MODELS)}"
    )
    asked: list[str] = []
    load, load_dataset = local_hub(tmp_path, asked)
    monkeypatch.setattr(hub, "_load", load)
    monkeypatch.setattr(sources, "load_hub_dataset", load_dataset)
    trainers: list[lightning.Trainer] = []
    monkeypatch.setattr(lightning, "Trainer", stopping_trainer(trainers))
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {}
    for heading, snippet in snippets:
        asked.append(heading)
        exec(compile(snippet, f"README.md ({heading})", "exec"), scope)  # noqa: S102 (the documented code)
    quick, homodistil = trainers
    # Each fit ran its steps under the schedule the snippet set, not a shortened one.
    assert (quick.global_step, quick.max_steps) == (STEPS, 100_000)
    assert (homodistil.global_step, homodistil.max_steps) == (STEPS, 28_000)
    assert scope["pruning"].schedule.end_step == 20_000
    # Quick start: six of the twelve blocks, the student exported where DistillationReport was told
    assert quick.lightning_module.student.config.num_hidden_layers == 6
    assert (tmp_path / "student" / "config.json").is_file()
    # HomoDistil: the student starts as the teacher's copy, at full width until the first event at step 10
    assert homodistil.lightning_module.student.config.hidden_size == 320


def test_snippets_are_found_under_their_headings_and_unknown_hub_names_fail(tmp_path: Path) -> None:
    text = "# A\n```python\nx = 1\n```\n## B\ntext\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert python_snippets(text) == [("A", "x = 1\n"), ("B", "y = 2\n")]
    load, load_dataset = local_hub(tmp_path, ["Quick start"])
    with pytest.raises(AssertionError, match="'bert-large-uncased', which has no stand-in"):
        load(BertForMaskedLM, "bert-large-uncased", "model")
    with pytest.raises(AssertionError, match="no stand-in"):
        load_dataset("allenai/c4", "en", "train")
