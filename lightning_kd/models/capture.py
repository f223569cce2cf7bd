"""Reading intermediate features through forward hooks, without rewriting the model's forward."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lightning_kd.models.adapter import LayerParts
from lightning_kd.models.bound import BoundModel, bind


@contextmanager
def capture_qkv(
    model: nn.Module | BoundModel, layers: Iterable[int]
) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
    """Yield a dict that the forward pass fills with ``{layer: {"query": q, "key": k, "value": v}}``.

    The tensors are the projections' outputs, shape ``(batch, seq, heads * head_size)``, so they exist
    for any attention implementation (eager, sdpa, flash); a fused map's output is split by role. With rotary
    embeddings they are the query and key before rotation.
    """
    bound = bind(model)
    all_layers = bound.layers()
    store: dict[int, dict[str, torch.Tensor]] = {}
    handles = []

    def keep(index: int, parts: LayerParts, linear: nn.Linear):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            # a fused map's output holds the query, key and value blocks; each role gets its own
            store.setdefault(index, {}).update(parts.split_qkv(linear, output))

        return hook

    try:
        for index in layers:
            parts = bound.layer_parts(all_layers[index])
            for linear in parts.head_projections:
                if parts.qkv_roles(linear):  # not DeBERTa's positional projections
                    handles.append(linear.register_forward_hook(keep(index, parts, linear)))
        yield store
    finally:
        for handle in handles:
            handle.remove()
