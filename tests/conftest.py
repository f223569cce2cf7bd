"""Fixtures for the top-level tests: nothing here downloads."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
import torch
from tiny_models import FAMILIES, tiny_bert_config
from transformers import BertForMaskedLM

import lightning_kd

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(2)


@pytest.fixture
def teacher() -> BertForMaskedLM:
    torch.manual_seed(0)
    return BertForMaskedLM(tiny_bert_config()).eval()


@pytest.fixture(autouse=True)
def library_messages_on_stdout() -> Iterator[None]:
    """What a user sees at a terminal: the lightning_kd logger's messages on stdout. (Under pytest the root
    logger has pytest's handlers, so the library would leave its messages to them, as it does in an application
    that configured logging.)"""
    logger = logging.getLogger("lightning_kd")
    handler = lightning_kd._StdoutHandler()
    # (installed already when lightning_kd was imported before pytest's logging handlers were)
    if not any(isinstance(h, lightning_kd._StdoutHandler) for h in logger.handlers):
        logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    level = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.removeHandler(handler)
    logger.propagate = propagate
    logger.setLevel(level)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and leave the other core to whatever else runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=list(FAMILIES))
def arch(request: pytest.FixtureRequest) -> str:
    """Each architecture family with an adapter, by the name ``tiny_models.make_model`` takes (the decoders that
    only vary Llama's layout run their own tests: ``tiny_models.LAYOUT_VARIANTS``)."""
    return request.param
