"""The offline decoder tokenizer (a byte-level BPE of the docstrings) and the docstrings' held-out split: the same
tokenizer in every process, an end-of-text token causal blocks can use, built once, text back exactly, and a
split that holds every docstring once."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_kd import hub
from lightning_kd.datamodules import docstrings_tokenizer
from lightning_kd.datamodules.causal import end_of_text
from lightning_kd.datamodules.common import get_tokenizer
from lightning_kd.datamodules.docstrings import docstrings_path, in_validation, read_docstrings
from lightning_kd.datamodules.docstrings_tokenizer import (
    DOCSTRINGS_TOKENIZER,
    END_OF_TEXT,
    build_tokenizer,
    docstrings_tokenizer_folder,
)
from lightning_kd.datamodules.sources import DataSourceError, parse_source, read_documents


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """600 docstrings of the training split (read inside the tests, under the data tests' own cache dir)."""
    return [record["text"] for record in read_docstrings(docstrings_path(["stdlib"], split="train"))][:600]


def test_learning_it_again_gives_the_same_tokenizer(texts: list[str]) -> None:
    """The BPE trainer keeps its counts in hash maps whose seeds differ from one map to the next (ahash), so two
    builds hash differently even in one process: the merges must not depend on that."""
    first = build_tokenizer(texts, 400).backend_tokenizer.to_str()
    assert all(build_tokenizer(texts, 400).backend_tokenizer.to_str() == first for _ in range(2))
    assert (
        build_tokenizer(texts, 420).backend_tokenizer.to_str() != first
    )  # the comparison can tell them apart


def test_it_has_one_end_of_text_token_for_eos_bos_and_pad_and_adds_nothing_to_text(texts: list[str]) -> None:
    tokenizer = build_tokenizer(texts, 400)
    assert len(tokenizer) == 400 and tokenizer.all_special_tokens == [END_OF_TEXT]
    assert end_of_text(tokenizer) == tokenizer.bos_token_id == tokenizer.pad_token_id == 0
    assert tokenizer.convert_tokens_to_ids(END_OF_TEXT) == 0
    ids = tokenizer("Return the value.")["input_ids"]
    assert 0 not in ids  # no bos or eos added: causal blocks put end of text between documents themselves
    assert tokenizer(f"a{END_OF_TEXT}b")["input_ids"][1] == 0  # one token, not its characters


def test_the_shipped_tokenizer_gives_back_every_docstring_exactly() -> None:
    tokenizer = get_tokenizer(DOCSTRINGS_TOKENIZER)
    texts = [record["text"] for record in read_docstrings(docstrings_path(["stdlib"]))]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert tokenizer.batch_decode(encoded) == texts
    assert len(tokenizer) == docstrings_tokenizer.VOCAB_SIZE and tokenizer.eos_token == END_OF_TEXT
    # merges learned from the docstrings: a few characters per token, where bytes alone would give one
    assert sum(map(len, texts)) / sum(map(len, encoded)) > 2.0


def test_recipes_name_it_and_it_is_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    folder = Path(hub.resolve_pretrained(DOCSTRINGS_TOKENIZER))
    assert folder == docstrings_tokenizer_folder() and (folder / "tokenizer.json").is_file()

    def build_again(*args: object) -> None:
        raise AssertionError("the cached tokenizer was built again")

    monkeypatch.setattr(docstrings_tokenizer, "build_tokenizer", build_again)
    assert docstrings_tokenizer_folder() == folder
    assert hub.load_tokenizer(DOCSTRINGS_TOKENIZER).get_vocab() == get_tokenizer(folder).get_vocab()


def test_another_vocabulary_size_is_another_folder_and_too_small_a_size_is_refused(
    tmp_path: Path, texts: list[str]
) -> None:
    corpus = docstrings_path(["stdlib"])
    (tmp_path / corpus.name).write_bytes(corpus.read_bytes())  # the corpus without collecting it again
    small = docstrings_tokenizer_folder(300, cache_dir=tmp_path)
    assert small != docstrings_tokenizer_folder(cache_dir=tmp_path)
    assert len(get_tokenizer(small)) == 300
    assert not list(tmp_path.glob(".*.tmp")), "a staging folder was left behind"
    with pytest.raises(ValueError, match="at least 258"):
        build_tokenizer(texts, 257)


def test_the_splits_hold_every_docstring_once_and_hold_out_one_in_twenty() -> None:
    every = read_docstrings(docstrings_path(["stdlib"]))
    train = read_docstrings(docstrings_path(["stdlib"], split="train"))
    held_out = read_docstrings(docstrings_path(["stdlib"], split="validation"))
    texts = sorted(r["text"] for r in every)
    assert sorted(r["text"] for r in train + held_out) == texts
    assert all(in_validation(r["text"]) for r in held_out) and not any(
        in_validation(r["text"]) for r in train
    )
    assert 0.03 < len(held_out) / len(every) < 0.07
    # shuffled by a hash of the text: a stream of the split does not read one module after another
    position = {r["text"]: i for i, r in enumerate(every)}
    train_texts = [r["text"] for r in train]
    assert train_texts != sorted(train_texts, key=position.__getitem__)
    assert len({r["module"].split(".")[0] for r in train[:200]}) > 20


def test_a_source_reads_its_split_and_an_unknown_split_is_refused_with_the_choices() -> None:
    spec = parse_source({"name": "docstrings", "split": "validation"})
    read = list(read_documents(spec, 0, 1))
    assert read == [r["text"] for r in read_docstrings(docstrings_path(["stdlib"], split="validation"))]
    assert parse_source("docstrings").split is None  # every docstring, as before
    with pytest.raises(DataSourceError, match="split: train or split: validation"):
        list(read_documents(parse_source({"name": "docstrings", "split": "test"}), 0, 1))
