"""Whole-layer structure: keeping a subset of a model's transformer blocks."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

from torch import nn

from lightning_kd.models.bound import BoundModel, bind, try_bind, unbind


def uniform_layer_choice(num_layers: int, keep: int) -> list[int]:
    """``keep`` layer indices spread evenly over ``num_layers``, always including the last.

    12 -> 6 gives [1, 3, 5, 7, 9, 11]: every other layer, ending at the top, as ETD takes them. (DistilBERT
    initialised from layers [0, 2, 4, 7, 9, 11]; pass them as ``layers`` to reproduce it.)
    """
    if not 0 < keep <= num_layers:
        raise ValueError(f"cannot keep {keep} of {num_layers} layers: choose between 1 and {num_layers}.")
    step = num_layers / keep
    return [round(step * (i + 1)) - 1 for i in range(keep)]


def max_sequence_length(model: nn.Module | BoundModel) -> int | None:
    """The longest input ``model``'s position embeddings cover, or None when it has no absolute limit."""
    bound = try_bind(model)
    if bound is None:  # an architecture without an adapter: its config says
        return getattr(unbind(model).config, "max_position_embeddings", None)
    return bound.max_positions()


def keep_layers_(model: nn.Module | BoundModel, indices: Sequence[int]) -> nn.Module:
    """Keep only the blocks at ``indices`` (in that order), in place; returns the (plain) model."""
    bound = bind(model)
    total = bound.num_layers()
    bad = [i for i in indices if not 0 <= i < total]
    if bad or not indices:
        raise ValueError(
            f"layer indices {list(indices)} are invalid for a model with {total} layers "
            f"(valid: 0..{total - 1}, at least one)."
        )
    layers = bound.layers()
    kept = nn.ModuleList([layers[i] for i in indices])
    config = bound.config()
    first = bound.layer_parts(kept[0]).attention_norm
    if bound.adapter.first_block_without_attention_norm and indices[0] != 0 and first is not None:
        bound.adapter.drop_attention_norm(kept[0])
        warnings.warn(
            f"{type(bound.model).__name__}'s first block has no attention norm (it reads the embedding norm), "
            f"so layer {indices[0]}, now first, lost its attention norm. Keep layer 0 to keep every norm.",
            stacklevel=2,
        )
    bound.adapter.set_layers(bound.model, kept)
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == total:
        # each kept block keeps its attention kind (full or sliding), and the config says so for reloads
        config.layer_types = [config.layer_types[i] for i in indices]
    for position, layer in enumerate(kept):
        # some implementations read the layer index (caching, logging); keep it consistent with the new depth
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    return bound.model


def select_layers(model: nn.Module | BoundModel, indices: Sequence[int]) -> nn.Module:
    """A copy of ``model`` that keeps only the transformer blocks at ``indices`` (in that order)."""
    bound = bind(model)  # fails on an unsupported architecture before copying a large model
    total = bound.num_layers()
    if not indices or any(not 0 <= i < total for i in indices):
        keep_layers_(bound, indices)  # raises the descriptive error without touching the model
    return keep_layers_(bound.on(copy.deepcopy(bound.model)), indices)


def is_classifier(model: nn.Module) -> bool:
    """Whether the model carries a sequence-classification head (its logits are one row per example).

    Encoders call that head ``classifier``; the decoders (Llama, Qwen, Mistral) call it ``score``, so the class
    says."""
    named = hasattr(model, "classifier") or type(model).__name__.endswith("ForSequenceClassification")
    return named and not is_question_answering(model)


def is_question_answering(model: nn.Module) -> bool:
    """Whether the model carries an extractive question-answering head (start and end logits per token).

    BERT-era families call that head ``qa_outputs``; ModernBERT calls it ``classifier``, so the class says.
    """
    return isinstance(getattr(model, "qa_outputs", None), nn.Module) or type(model).__name__.endswith(
        "ForQuestionAnswering"
    )


def freeze_unused_pooler(model: nn.Module) -> None:
    """Freeze a bare encoder's pooler: no distillation term reads it, and parameters without gradients break
    DDP, but it is kept (and pruned with the hidden dimensions) so that the exported student carries the
    teacher's pooler, and a classifier fine-tuned from it does not start from a random one. Models with a task
    head train theirs (a classifier reads it)."""
    base = getattr(model, "base_model", model)
    if base is model and getattr(model, "pooler", None) is not None:
        model.pooler.requires_grad_(False)
