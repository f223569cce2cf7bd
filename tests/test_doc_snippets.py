"""Every Python snippet of README.md and docs/*.md, run as written where it can be: hub names stand for local
tiny models, the names a page assumes its reader has (a module, data) are given, and training stops after a few
steps by a callback the test adds, so each run keeps the schedule its snippet sets."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import lightning
import pytest
import torch
import wandb
from kd_helpers import FixedBatches, tiny_bert_config
from transformers import BertConfig, BertForMaskedLM, BertForQuestionAnswering, BertTokenizerFast

from lightning_kd import DistillationModule, PretrainingDataModule, PruningCallback, SQuADDataModule, hub
from lightning_kd.datamodules import sources

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the a one two of and to in is was for on with as by at from it this that student teacher model layer head "
    "neuron width prune distil learn step small large fast slow quiet brown fox jumps over lazy dog river"
).split()
STEPS = 2  # training steps each snippet's fit runs before the added callback stops it

# Stand-in shapes. The Quick start student takes six of the teacher's blocks, so DEEP has twelve; the HomoDistil
# targets are counts for BERT-base (256 hidden, 4 heads, 1024 neurons), so WIDE is wider than those, one block deep.
DEEP = dict(hidden_size=32, num_hidden_layers=12, num_attention_heads=4, intermediate_size=64)
WIDE = dict(hidden_size=320, num_hidden_layers=1, num_attention_heads=5, intermediate_size=1280)

# Per document, per heading a snippet sits under: what its hub names stand for, or why it does not run here. The
# headings must match the document's snippets one for one, so a new snippet fails until it is listed: none is
# skipped silently. A document's snippets run in order in one scope, as a reader runs them (the README's second
# reuses the first's `data`).
SNIPPETS: dict[str, dict[str, dict[str, dict[str, int]] | str]] = {
    "README.md": {
        "Quick start": {"bert-base-uncased": DEEP},
        "HomoDistil: prune while distilling": {"bert-base-uncased": WIDE},
    },
    "docs/dashboards.md": {
        "Dashboards: W&B, and the same without it": {},
        "Without W&B: CSV and a summary PNG": {},
        "One run across resumes and requeues": "it resumes a checkpoint; tests/faults/test_logged_run.py calls "
        "continue_logged_run the same way, in Python and through the CLI after a SIGKILL",
        "Reading an offline run": {},
    },
    "docs/homodistil.md": {"HomoDistil: pruning while distilling": {}},
    "docs/model_surgery.md": {
        "Units and masks": "a sketch of the masks' shapes, not code",
        "ETD: `extract`": {},
    },
    "docs/squad.md": {
        "Data": {"microsoft/deberta-v3-xsmall": DEEP},
        "A model you can ship": {},
    },
    "docs/operations.md": {
        "DDP, FSDP2, or FSDP2 with a replicated teacher": "a sketch for 8 devices; tests/training/test_fsdp.py "
        "trains with fsdp2() (teacher sharded and replicated, bf16) on 2 gloo processes",
    },
    "docs/decoders.md": {
        "Decoder LMs: Llama, Mistral, Qwen2/2.5, Qwen3": "tests/distillation/test_causal_lm.py runs it on a tiny "
        "Llama (test_the_snippet_in_docs_decoders_builds_as_written)",
        "Evaluating with lm-evaluation-harness": "it needs lm-evaluation-harness (the optional harness extra) "
        "and its task data",
    },
}
# The hub datasets the snippets stream: each stands for a small local parquet file of its text column.
DATASETS = {("wikimedia/wikipedia", "20231101.en", "train"), ("bookcorpus/bookcorpus", None, "train")}


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


def write_corpus(path: Path) -> Path:
    text = [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(8 + i % 17)) for i in range(64)]
    datasets.Dataset.from_dict({"text": text}).to_parquet(str(path))
    return path


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


def local_hub(
    tmp_path: Path, document: str, asked: list[str]
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Loaders of models, tokenizers and datasets that serve only ``document``'s stand-ins and fail on any other
    hub name; ``asked[-1]`` is the heading of the snippet running."""
    folders = {
        (heading, name): write_model(tmp_path / "hub" / f"{i}-{j}", **shape)
        for i, (heading, names) in enumerate(SNIPPETS[document].items())
        if isinstance(names, dict)
        for j, (name, shape) in enumerate(names.items())
    }
    corpus = write_corpus(tmp_path / "hub" / "corpus.parquet")

    def load(loader: Any, name: object, what: str, **kwargs: Any) -> Any:
        if Path(str(name)).is_dir():  # a local folder: a stand-in named again, or what the test gives
            return loader.from_pretrained(name, **kwargs)
        heading = asked[-1]
        if (heading, str(name)) not in folders:
            raise AssertionError(
                f"the {document} snippet under {heading!r} loads the {what} {name!r}, which has no stand-in: "
                "add it to SNIPPETS in tests/test_doc_snippets.py"
            )
        return loader.from_pretrained(folders[(heading, str(name))], **kwargs)

    def load_dataset(name: str, config: str | None = None, split: str | None = None, **kwargs: Any) -> Any:
        if (name, config, split) not in DATASETS:
            raise AssertionError(
                f"a {document} snippet streams the hub dataset {(name, config, split)}, which has no stand-in: "
                "add it to DATASETS in tests/test_doc_snippets.py"
            )
        return datasets.load_dataset("parquet", data_files=str(corpus), split="train", streaming=True)

    return load, load_dataset


def listed_snippets(document: str) -> list[tuple[str, str]]:
    """``document``'s snippets, checked against SNIPPETS one for one."""
    snippets = python_snippets((ROOT / document).read_text(encoding="utf-8"))
    headings, listed = [heading for heading, _ in snippets], list(SNIPPETS.get(document, {}))
    assert headings == listed, (
        f"{document}'s Python snippets sit under {headings}; SNIPPETS in tests/test_doc_snippets.py lists "
        f"{listed}: give each its stand-ins, or the reason it does not run here"
    )
    return snippets


def test_every_document_with_python_snippets_is_listed() -> None:
    documents = ["README.md", *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").glob("*.md")))]
    with_snippets = [document for document in documents if python_snippets((ROOT / document).read_text())]
    assert sorted(with_snippets) == sorted(SNIPPETS), "list each document's snippets in SNIPPETS"
    for document in with_snippets:
        listed_snippets(document)


def run_snippets(
    document: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    given: Callable[[Path], dict[str, Any]] | None = None,
    before: dict[str, Callable[[], object]] | None = None,
) -> tuple[dict[str, Any], list[lightning.Trainer]]:
    """Run ``document``'s snippets in order in ``tmp_path``, in one scope that starts with what ``given`` returns
    (what the page assumes its reader has, built once the Trainer is patched), calling ``before[heading]`` first
    where the page assumes something happened in between; returns the scope and the Trainers the snippets
    built."""
    snippets = listed_snippets(document)
    asked: list[str] = []
    load, load_dataset = local_hub(tmp_path, document, asked)
    monkeypatch.setattr(hub, "_load", load)
    monkeypatch.setattr(sources, "load_hub_dataset", load_dataset)
    trainers: list[lightning.Trainer] = []
    patched = stopping_trainer(trainers)
    monkeypatch.setattr(lightning, "Trainer", patched)
    monkeypatch.setattr(lightning.pytorch, "Trainer", patched)  # `from lightning.pytorch import Trainer`
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = given(tmp_path) if given else {}
    for heading, snippet in snippets:
        if isinstance(SNIPPETS[document][heading], str):
            continue  # not run here, for the reason SNIPPETS gives
        asked.append(heading)
        (before or {}).get(heading, lambda: None)()
        exec(compile(snippet, f"{document} ({heading})", "exec"), scope)  # noqa: S102 (the documented code)
    return scope, trainers


def test_every_python_snippet_of_the_readme_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    scope, (quick, homodistil) = run_snippets("README.md", tmp_path, monkeypatch)
    # Each fit ran its steps under the schedule the snippet set, not a shortened one.
    assert (quick.global_step, quick.max_steps) == (STEPS, 100_000)
    assert (homodistil.global_step, homodistil.max_steps) == (STEPS, 28_000)
    assert scope["pruning"].schedule.end_step == 20_000
    # Quick start: six of the twelve blocks, the student exported where DistillationReport was told
    assert quick.lightning_module.student.config.num_hidden_layers == 6
    assert (tmp_path / "student" / "config.json").is_file()
    # HomoDistil: the student starts as the teacher's copy, at full width until the first event at step 10
    assert homodistil.lightning_module.student.config.hidden_size == 320


def stop_wandb() -> None:
    """End the run and wandb's service, as the end of the process that ran it does: offline, ``finish`` alone can
    return before the run file is written out (wandb 0.31)."""
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """W&B offline, its settings inside tmp_path. Its service resolves relative run folders against the folder it
    started in, so it is stopped before (the snippet's run starts it in tmp_path) and after."""

    stop_wandb()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR", "WANDB_CONFIG_DIR"):
        (tmp_path / "wandb_home" / name).mkdir(parents=True)
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name))
    yield
    stop_wandb()


def test_every_python_snippet_of_the_dashboards_page_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_wandb: None
) -> None:
    def given(tmp_path: Path) -> dict[str, Any]:
        # what the page assumes: a module and data, here HomoDistil's start on the wide stand-in
        teacher = write_model(tmp_path / "teacher", **WIDE)
        return {
            "module": DistillationModule(
                str(teacher), {"init": "copy"}, task="masked-lm", objective=[{"term": "logits"}]
            ),
            "data": PretrainingDataModule(
                tokenizer=str(teacher),
                sources=[str(write_corpus(tmp_path / "corpus.parquet"))],
                max_length=16,
                batch_size=2,
            ),
        }

    scope, (trainer,) = run_snippets(
        "docs/dashboards.md", tmp_path, monkeypatch, given, before={"Reading an offline run": stop_wandb}
    )
    assert (trainer.global_step, trainer.max_steps) == (STEPS, 28_000)
    csv_folder = tmp_path / "runs" / "homobert_small" / "csv" / "version_0"
    assert (csv_folder / "summary.png").is_file() and (tmp_path / "homobert_small.png").is_file()
    assert "train/loss" in scope["series"]
    # the offline run's records hold the logged rows the page prints
    kinds = [record.WhichOneof("record_type") for record in scope["records"]]
    assert "history" in kinds and "metric" in kinds
    histories = [str(r.history) for r in scope["records"] if r.WhichOneof("record_type") == "history"]
    assert any("trainer/global_step" in history for history in histories)


def test_the_homodistil_page_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def given(tmp_path: Path) -> dict[str, Any]:
        # the page's names: a Trainer (the patched one), the callback, a module and data of known length
        torch.manual_seed(0)
        teacher = BertForMaskedLM(tiny_bert_config()).eval()
        return {
            "Trainer": lightning.Trainer,
            "PruningCallback": PruningCallback,
            "module": DistillationModule(teacher, {"init": "copy"}, objective=[{"term": "logits"}]),
            "datamodule": FixedBatches(),
        }

    _, (trainer,) = run_snippets("docs/homodistil.md", tmp_path, monkeypatch, given)
    (pruning,) = [c for c in trainer.callbacks if isinstance(c, PruningCallback)]
    # no end_step: the schedule ends at the run's last step (1,000 epochs of 4 batches), as the page says
    assert trainer.global_step == STEPS and pruning.schedule.end_step == 4000


def test_the_extract_snippet_of_the_surgery_page_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def given(tmp_path: Path) -> dict[str, Any]:
        # a teacher wider and deeper than the student the page extracts, with 32-wide heads as it has
        folder = write_model(
            tmp_path / "teacher",
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=8,
            intermediate_size=1024,
        )
        tokenizer = BertTokenizerFast.from_pretrained(folder)
        texts = [" ".join(WORDS[i : i + 8]) for i in range(8)]
        batches = [dict(tokenizer(texts[i : i + 2], return_tensors="pt")) for i in range(0, 8, 2)]
        for batch in batches:
            batch["labels"] = batch["input_ids"].clone()
        return {"teacher": BertForMaskedLM.from_pretrained(folder).eval(), "train_dataloader": batches}

    scope, _ = run_snippets("docs/model_surgery.md", tmp_path, monkeypatch, given)
    config = scope["student"].config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (3, 192, 6)
    assert config.intermediate_size == 768


def test_the_squad_page_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def given(tmp_path: Path) -> dict[str, Any]:
        # the page's QA export and a context; SQuADDataModule by its bare name, as the page writes it
        folder = tmp_path / "runs" / "squad_tiny" / "model"
        write_model(folder, **DEEP)
        torch.manual_seed(0)
        config = BertConfig.from_pretrained(folder)
        BertForQuestionAnswering(config).save_pretrained(folder)
        return {"SQuADDataModule": SQuADDataModule, "context": " ".join(WORDS)}

    scope, _ = run_snippets("docs/squad.md", tmp_path, monkeypatch, given)
    assert set(scope["answers"].answers) == {"0"} and set(scope["answers"].null_odds) == {"0"}


def test_snippets_are_found_under_their_headings_and_unknown_hub_names_fail(tmp_path: Path) -> None:
    text = "# A\n```python\nx = 1\n```\n## B\ntext\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert python_snippets(text) == [("A", "x = 1\n"), ("B", "y = 2\n")]
    load, load_dataset = local_hub(tmp_path, "README.md", ["Quick start"])
    with pytest.raises(AssertionError, match="'bert-large-uncased', which has no stand-in"):
        load(BertForMaskedLM, "bert-large-uncased", "model")
    with pytest.raises(AssertionError, match="no stand-in"):
        load_dataset("allenai/c4", "en", "train")
