"""ETD, Extract Then Distill (Chen et al., 2021): a thin, shallow student cut out of the teacher's weights.

Layers are taken uniformly (``uniform_layer_choice``); within them the student keeps attention heads,
head dimensions (chosen per head), FFN neurons and hidden dimensions either at random (ETD-Rand) or by
importance (ETD-Impt), where importance is the sensitivity ``|theta * grad|`` of the teacher's own loss on a
sample of the training data.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_kd.checks import check_number
from lightning_kd.models.bound import BoundModel, bind
from lightning_kd.models.layers import uniform_layer_choice
from lightning_kd.pruning.importance import LossFn, score_units, top_units
from lightning_kd.pruning.prune import prune_model
from lightning_kd.pruning.units import full_masks

STRATEGIES = ("rand", "impt")


def _nearest_multiples(value: int, step: int, limit: int) -> list[int]:
    below = (value // step) * step
    candidates = {c for c in (below, below + step) if 0 < c <= limit}
    return sorted(candidates)


def _divisors(value: int, limit: int) -> list[int]:
    return [d for d in range(1, min(value, limit) + 1) if value % d == 0]


def _check_sizes(teacher: BoundModel, sizes: dict[str, int]) -> None:
    """Errors that name the size, the limit and the nearest valid choices."""
    counts = teacher.unit_counts()
    queries = teacher.queries_per_unit()
    limits = {
        "num_layers": counts["layers"],
        "hidden_size": counts["hidden"],
        "num_attention_heads": min(counts["heads"]) * queries,
        "intermediate_size": min(counts["ffn"]),
    }
    for name, value in sizes.items():
        check_number(name, value, low=0, low_open=True, integer=True, what="a positive integer")
        if value > limits[name]:
            raise ValueError(
                f"{name}={value} is larger than the teacher's {limits[name]}: extraction only removes units. "
                f"Choose {name} <= {limits[name]}."
            )
    hidden, heads = sizes["hidden_size"], sizes["num_attention_heads"]
    if queries > 1 and heads % queries:
        raise ValueError(
            f"num_attention_heads={heads}: under grouped-query attention heads go in key/value groups of {queries} "
            f"query heads, so choose a multiple of {queries} (e.g. {max(queries, heads // queries * queries)})."
        )
    if teacher.adapter.free_head_size and teacher.adapter.rotary:
        return  # the head size is stored and kept (rotary): any hidden width holds any number of heads
    if hidden % heads:
        raise ValueError(
            f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}. Nearest valid hidden sizes: "
            f"{_nearest_multiples(hidden, heads, limits['hidden_size'])}; or head counts that divide {hidden}: "
            f"{_divisors(hidden, limits['num_attention_heads'])}."
        )
    head_size = teacher.head_size()
    if teacher.adapter.rotary and hidden != heads * head_size:
        raise ValueError(
            f"hidden_size={hidden} with num_attention_heads={heads} means heads of size {hidden // heads}, but "
            f"{type(teacher.model).__name__}'s heads rotate at frequencies set by their size ({head_size}), so "
            f"they cannot be narrowed. Choose num_attention_heads={hidden // head_size} (hidden_size / {head_size})"
            f" with a hidden_size that is a multiple of {head_size}, or leave num_attention_heads unset."
        )
    if hidden // heads > head_size:
        fewest = -(-hidden // head_size)
        raise ValueError(
            f"hidden_size={hidden} with num_attention_heads={heads} means heads of size {hidden // heads}, wider "
            f"than the teacher's {head_size}. Use at least {fewest} heads, or hidden_size <= {heads * head_size}."
        )


def extract(
    teacher: nn.Module | BoundModel,
    num_layers: int | None = None,
    hidden_size: int | None = None,
    num_attention_heads: int | None = None,
    intermediate_size: int | None = None,
    strategy: str = "rand",
    data: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    max_batches: int | None = 32,
    seed: int = 0,
) -> nn.Module:
    """A student of the teacher's class with the requested sizes, initialised from the teacher's weights.

    Sizes left as None keep the teacher's. ``strategy="impt"`` needs ``data``: batches the teacher accepts
    as ``teacher(**batch)`` with labels (or pass ``loss_fn(model, batch) -> loss``); at most ``max_batches``
    are used. The student's head size is ``hidden_size / num_attention_heads``; when it is smaller than the
    teacher's, every head keeps its most important (or random) dimensions and the queries are rescaled so
    that attention scores keep the teacher's temperature. Rotary heads (ModernBERT) keep their size: a
    narrower student has fewer of them, ``hidden_size / head size`` unless given; where the config stores the
    head size as well (Llama, Qwen, Mistral) the student keeps the teacher's head size at any hidden width, and
    under grouped-query attention ``num_attention_heads`` counts query heads, a multiple of the heads per
    key/value group, kept as whole groups. The teacher is not modified.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown extraction strategy {strategy!r}; choose 'rand' or 'impt'.")
    bound = bind(teacher)
    counts = bound.unit_counts()
    queries = bound.queries_per_unit()
    if (
        num_attention_heads is None
        and hidden_size is not None
        and bound.adapter.rotary
        and not bound.adapter.free_head_size
    ):
        # rotary heads keep their size, so a narrower stream holds fewer of them
        num_attention_heads = max(1, hidden_size // counts["head_size"])
    sizes = {
        "num_layers": counts["layers"] if num_layers is None else num_layers,
        "hidden_size": counts["hidden"] if hidden_size is None else hidden_size,
        "num_attention_heads": (
            max(counts["heads"]) * queries if num_attention_heads is None else num_attention_heads
        ),
        "intermediate_size": max(counts["ffn"]) if intermediate_size is None else intermediate_size,
    }
    _check_sizes(bound, sizes)
    if strategy == "impt":
        if data is None:
            raise ValueError(
                "strategy='impt' scores units with the teacher's own loss and needs data: pass data= an "
                "iterable of training batches (a DataLoader), or use strategy='rand'."
            )
        scores = score_units(bound, data, method="sensitivity", loss_fn=loss_fn, max_batches=max_batches)
    else:
        scores = score_units(bound, method="random", seed=seed)

    exists = full_masks(bound)
    free_rotary = bound.adapter.free_head_size and bound.adapter.rotary
    head_size = counts["head_size"] if free_rotary else sizes["hidden_size"] // sizes["num_attention_heads"]
    layers = torch.zeros(counts["layers"], dtype=torch.bool)
    layers[uniform_layer_choice(counts["layers"], sizes["num_layers"])] = True

    def best(kind: str, keep: int) -> torch.Tensor:
        # units that a pruned teacher no longer has must never be chosen
        ranked = scores[kind].masked_fill(~exists[kind], float("-inf")) if kind in exists else scores[kind]
        return top_units(ranked, keep)

    masks = {
        "layers": layers,
        "heads": best("heads", sizes["num_attention_heads"] // queries),  # whole key/value groups under GQA
        "ffn": best("ffn", sizes["intermediate_size"]),
        "hidden": best("hidden", sizes["hidden_size"]),
    }
    if head_size < counts["head_size"]:
        masks["head_dims"] = best("head_dims", head_size)
    student = prune_model(bound, masks)
    student.requires_grad_(True)
    student.train(bound.model.training)
    return student
