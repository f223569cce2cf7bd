"""Fixtures for the top-level tests: nothing here downloads."""

from __future__ import annotations

import os

import pytest
import torch
from kd_helpers import tiny_bert_config
from transformers import BertForMaskedLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(2)


@pytest.fixture
def teacher() -> BertForMaskedLM:
    torch.manual_seed(0)
    return BertForMaskedLM(tiny_bert_config()).eval()
