"""Whole-layer structure: keeping a subset of a model's transformer blocks."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from .registry import get_adapter


def uniform_layer_choice(num_layers: int, keep: int) -> list[int]:
    """``keep`` layer indices spread evenly over ``num_layers``, always including the last.

    12 -> 6 gives [1, 3, 5, 7, 9, 11]: every other layer, ending at the top, as DistilBERT and ETD take them.
    """
    if not 0 < keep <= num_layers:
        raise ValueError(f"cannot keep {keep} of {num_layers} layers: choose between 1 and {num_layers}.")
    step = num_layers / keep
    return [round(step * (i + 1)) - 1 for i in range(keep)]


def select_layers(model: nn.Module, indices: Sequence[int]) -> nn.Module:
    """A copy of ``model`` that keeps only the transformer blocks at ``indices`` (in that order)."""
    adapter = get_adapter(model)
    total = adapter.num_layers(model)
    bad = [i for i in indices if not 0 <= i < total]
    if bad or not indices:
        raise ValueError(
            f"layer indices {list(indices)} are invalid for a model with {total} layers "
            f"(valid: 0..{total - 1}, at least one)."
        )
    student = copy.deepcopy(model)
    layers = adapter.layers(student)
    kept = nn.ModuleList([layers[i] for i in indices])
    encoder = adapter.base_model(student).encoder
    encoder.layer = kept
    student.config.num_hidden_layers = len(kept)
    for position, layer in enumerate(kept):
        # some implementations read the layer index (caching, logging); keep it consistent with the new depth
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    return student
