"""Small local corpora and GLUE folders written by the tests; the tokenizer is MiniLM's, packaged offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kd_datafiles import GLUE_FOLDERS, TOKENIZER, write_glue_task, write_glue_test_files, write_lines
from transformers import PreTrainedTokenizerBase

from lightning_kd.hub import load_tokenizer


@pytest.fixture(scope="session", autouse=True)
def _docstrings_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["LIGHTNING_KD_CACHE"] = str(tmp_path_factory.mktemp("kd-cache"))


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_tokenizer(TOKENIZER)


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    """One text file of 120 documents, one per line (about 10 KB)."""
    path = tmp_path / "corpus.txt"
    return path, write_lines(path, 120)


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("glue_data")
    for task in GLUE_FOLDERS:
        write_glue_task(root, task)
        write_glue_test_files(root, task)
    return root
