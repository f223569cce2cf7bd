"""Physical removal: slice every coupled matrix and return a smaller model of the same class."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from lightning_kd.models.adapter import query_rescale
from lightning_kd.models.bound import BoundModel, bind
from lightning_kd.models.layers import keep_layers_
from lightning_kd.pruning.units import (
    Masks,
    _check_kinds,
    _hidden_modules,
    axes,
    kept_index,
    masked_parameter_slices,
    validate_masks,
)


@dataclass(frozen=True)
class Resize:
    """``old`` was replaced by ``new``, which keeps the entries ``index[dim]`` of ``old`` along each ``dim``.

    Whatever else is laid out like ``old`` (optimizer moments) follows with the same indices.
    """

    old: nn.Parameter
    new: nn.Parameter
    index: dict[int, torch.Tensor]


def prune_model(model: nn.Module | BoundModel, masks: Masks) -> nn.Module:
    """A copy of ``model`` without the units that ``masks`` removes (see ``units.py`` for the mask format).

    The copy computes exactly what ``apply_masks(model, masks)`` computes. When every kept layer keeps the
    same number of heads and FFN neurons its config is a standard one; otherwise the config holds the
    largest per-layer sizes and ``export_pretrained`` pads the layers so that plain transformers loads it.
    ``masks["head_dims"]`` narrows every head (each keeps its own dimensions) and rescales the queries so that attention scores keep the
    teacher's temperature (``q.k / sqrt(old head size)``); that is an initialisation, not a masked model.
    """
    _check_kinds(masks)  # the first complaint, as validate_masks makes it
    bound = bind(model)  # fails on an unsupported architecture before copying a large model
    masks = validate_masks(bound, masks)
    student = copy.deepcopy(bound.model)
    prune_model_(bound.on(student), masks)
    return student


def prune_model_(model: nn.Module | BoundModel, masks: Masks) -> list[Resize]:
    """``prune_model`` in place: ``model`` itself loses the units ``masks`` removes (same object, same class).

    Returns every parameter that was replaced and how, so that an optimizer, DDP or anything else holding
    the old parameters can follow (see ``shrink.py``). Parameters of removed layers are simply gone.
    """
    bound = bind(model)
    masks = validate_masks(bound, masks)
    counts = bound.unit_counts()

    # tied weights (word embeddings and MLM decoder) are one Parameter: slice it once, share the result
    cuts: dict[int, tuple[nn.Parameter, dict[int, torch.Tensor]]] = {}
    for axis in axes(bound):
        index = kept_index(axis, masks, counts)
        if index is not None:
            cuts.setdefault(id(axis.parameter), (axis.parameter, {}))[1][axis.dim] = index
    replacements: dict[int, nn.Parameter] = {}
    resizes: list[Resize] = []
    for key, (parameter, dims) in cuts.items():
        data = parameter.data
        dims = {dim: index.to(data.device) for dim, index in dims.items()}
        for dim, index in dims.items():
            data = data.index_select(dim, index)
        replacements[key] = nn.Parameter(data, requires_grad=parameter.requires_grad)
        resizes.append(Resize(parameter, replacements[key], dims))
    for module in bound.model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None and id(parameter) in replacements:
                module._parameters[name] = replacements[id(parameter)]
        _refresh_shape(module)
    if "hidden" in masks:
        # norms without affine weights have nothing to slice but still carry their width
        for norm in _hidden_modules(bound)[2]:
            if hasattr(norm, "normalized_shape"):
                norm.normalized_shape = (int(masks["hidden"].sum()),)

    head_size = counts["head_size"]
    if "head_dims" in masks:
        layer = int(masks.get("layers", torch.ones(counts["layers"], dtype=torch.bool)).nonzero()[0])
        head = int(masks["heads"][layer].nonzero()[0]) if "heads" in masks else 0
        head_size = int(masks["head_dims"][layer, head].sum())  # every kept head keeps as many (validated)
    for layer in bound.layers():
        parts = bound.layer_parts(layer)
        if head_size != counts["head_size"]:
            parts.scale_queries_(query_rescale(counts["head_size"], head_size))
        bound.adapter.set_attention_shape(layer, parts.attention_output.in_features // head_size, head_size)

    if "layers" in masks:
        keep_layers_(bound, masks["layers"].nonzero().flatten().tolist())
    kept_layers = bound.layers()
    bound.adapter.update_config(
        bound.config(),
        hidden=bound.residual_width(),
        heads=max(
            bound.layer_parts(layer).attention_output.in_features // head_size for layer in kept_layers
        ),
        head_size=head_size,
        intermediate=max(bound.layer_parts(layer).ffn_output.in_features for layer in kept_layers),
        layers=len(kept_layers),
    )
    return resizes


def pruned_parameter_count(model: nn.Module | BoundModel, masks: Masks) -> int:
    """How many parameters ``prune_model(model, masks)`` would keep, without copying the model.

    Cheap enough to log at every pruning event of a BERT-base run.
    """
    bound = bind(model)
    removed: dict[int, dict[int, set[int]]] = {}
    for piece in masked_parameter_slices(bound, masks):
        removed.setdefault(id(piece.parameter), {}).setdefault(piece.dim, set()).update(piece.index.tolist())
    total = 0
    for parameter in bound.model.parameters():  # each tied parameter once
        shape = list(parameter.shape)
        for dim, index in removed.get(id(parameter), {}).items():
            shape[dim] -= len(index)
        total += math.prod(shape)
    return total


def _refresh_shape(module: nn.Module) -> None:
    """Keep the size attributes that modules print and some forwards read in line with the new weights."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = module.weight.shape
    elif isinstance(module, nn.Conv1d):
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.weight.shape[1] * module.groups
