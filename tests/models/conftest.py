"""Fixtures for the model-surgery tests."""

from __future__ import annotations

import pytest
import torch
from model_factory import ARCHITECTURES


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and leave the other core to whatever else runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=list(ARCHITECTURES))
def arch(request) -> str:
    return request.param
