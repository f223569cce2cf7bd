"""Structural units (heads, FFN neurons, hidden dimensions, layers), their masks, and masking a live model.

A mask set is a plain dict of bool tensors, easy to all-reduce under DDP and to put in a checkpoint:

    {"heads": [layers, heads], "ffn": [layers, intermediate], "hidden": [hidden], "layers": [layers]}

(under grouped-query attention a "head" is a key/value group with its query heads: see ``LayerParts``).

``True`` keeps a unit. Any key may be missing (nothing of that kind is masked). In a model whose layers were
already pruned to different widths the per-layer rows are padded: unit ``j`` of layer ``i`` exists only
when ``j < unit_counts(model)[kind][i]``, and mask entries past it are ignored. ``"head_dims"``
([layers, heads, head_size]: which dimensions each head keeps; a [layers, head_size] mask is shared by the
heads of a layer) narrows the heads and is used by ``extract``; it is not a maskable unit. Every kept head keeps
the same number of dimensions, since a config has one head size.

Masking semantics (``apply_masks``): a masked model computes exactly what ``prune_model`` computes.
Heads and FFN neurons are silenced by zeroing their contribution to the output projection, which is what
removing them does. Hidden dimensions are harder, because a LayerNorm's mean and variance run over all
dimensions: a masked model therefore *is the pruned model embedded in the full width*. Every map that reads
the residual stream sees masked dimensions as zero, every map that writes it outputs zero there, and every
norm on the residual stream (LayerNorm or RMSNorm) normalises over the kept dimensions only. Masked layers
pass their input through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kd.models.bound import BoundModel, bind

UNIT_KINDS: tuple[str, ...] = ("heads", "ffn", "hidden", "layers")
MASK_KINDS: tuple[str, ...] = (*UNIT_KINDS, "head_dims")
Masks = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Axis:
    """One dimension of one parameter that is laid out by units of ``kind`` (in ``layer``, unless hidden)."""

    name: str
    parameter: nn.Parameter
    dim: int
    kind: str  # "heads" (heads x head_size), "ffn" or "hidden"
    layer: int | None
    # equal blocks along ``dim``, each laid out by the same units: 3 for a fused query/key/value map, 2 for a
    # gated FFN's input map (removing a unit removes its entry in every block)
    blocks: int = 1
    # entries per unit of a "heads" axis: the head size, or a group's query heads under grouped-query attention
    unit_width: int | None = None


@dataclass(frozen=True)
class ParameterSlice:
    """The entries ``index`` along ``dim`` of the parameter ``name`` belong to removed units."""

    name: str
    parameter: nn.Parameter
    dim: int
    index: torch.Tensor


def _linear_axes(
    linear: nn.Linear, dim: int, kind: str, layer: int | None, blocks: int = 1, width: int | None = None
) -> list[tuple]:
    """A Linear's weight along ``dim``, plus its bias when the axis is the output one."""
    found = [(linear.weight, dim, kind, layer, blocks, width)]
    if dim == 0 and linear.bias is not None:
        found.append((linear.bias, 0, kind, layer, blocks, width))
    return found


def axes(model: nn.Module | BoundModel) -> list[Axis]:
    """Every (parameter, dimension) that some unit owns, each once even where weights are tied."""
    bound = bind(model)
    head_size = bound.head_size()
    raw: list[tuple] = []
    for i, layer in enumerate(bound.layers()):
        parts = bound.layer_parts(layer)
        for projection in parts.head_projections:
            width = parts.rows_per_unit(projection, head_size)
            raw += _linear_axes(projection, 0, "heads", i, parts.blocks(projection), width)
            raw += _linear_axes(projection, 1, "hidden", None)
        output_width = parts.rows_per_unit(parts.attention_output, head_size)
        raw += _linear_axes(parts.attention_output, 1, "heads", i, width=output_width)
        raw += _linear_axes(parts.attention_output, 0, "hidden", None)
        for ffn_input in parts.ffn_inputs:
            raw += _linear_axes(ffn_input, 0, "ffn", i, parts.blocks(ffn_input))
            raw += _linear_axes(ffn_input, 1, "hidden", None)
        raw += _linear_axes(parts.ffn_output, 1, "ffn", i) + _linear_axes(parts.ffn_output, 0, "hidden", None)
        for norm in parts.norms:
            raw += _norm_axes(norm)
    hidden = bound.hidden_parts()
    raw += [(e.weight, 1, "hidden", None, 1, None) for e in hidden.embeddings]
    for reader in hidden.readers:
        raw += _linear_axes(reader, 1, "hidden", None)
    for writer in hidden.writers:
        raw += _linear_axes(writer, 0, "hidden", None)
    for norm in hidden.norms:
        raw += _norm_axes(norm)
    for conv in hidden.convs:
        raw += [(conv.weight, 0, "hidden", None, 1, None), (conv.weight, 1, "hidden", None, 1, None)]
        if conv.bias is not None:
            raw.append((conv.bias, 0, "hidden", None, 1, None))
    names = {id(p): n for n, p in bound.model.named_parameters()}
    seen: set[tuple[int, int]] = set()
    result = []
    for parameter, dim, kind, layer, blocks, width in raw:
        key = (id(parameter), dim)
        if key in seen or id(parameter) not in names:
            continue
        seen.add(key)
        result.append(Axis(names[id(parameter)], parameter, dim, kind, layer, blocks, width))
    return result


def _norm_axes(norm: nn.Module) -> list[tuple]:
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    return [(p, 0, "hidden", None, 1, None) for p in (weight, bias) if p is not None]


def layer_parameters(model: nn.Module | BoundModel) -> list[list[tuple[str, nn.Parameter]]]:
    """The named parameters of each block, in layer order."""
    bound = bind(model)
    names = {id(p): n for n, p in bound.model.named_parameters()}
    return [[(names[id(p)], p) for p in layer.parameters()] for layer in bound.layers()]


def unit_counts(model: nn.Module | BoundModel) -> dict[str, list[int] | int]:
    """How many units of each kind exist: per layer for heads and FFN neurons, global otherwise."""
    return bind(model).unit_counts()


def _ragged(counts: list[int]) -> torch.Tensor:
    exists = torch.zeros(len(counts), max(counts), dtype=torch.bool)
    for i, count in enumerate(counts):
        exists[i, :count] = True
    return exists


def full_masks(model: nn.Module | BoundModel) -> Masks:
    """Masks that keep every existing unit (rows padded with False where a pruned layer is narrower)."""
    return _full_masks(unit_counts(model))


def _full_masks(counts: dict) -> Masks:
    return {
        "heads": _ragged(counts["heads"]),
        "ffn": _ragged(counts["ffn"]),
        "hidden": torch.ones(counts["hidden"], dtype=torch.bool),
        "layers": torch.ones(counts["layers"], dtype=torch.bool),
    }


def _check_kinds(masks: Masks) -> None:
    unknown = set(masks) - set(MASK_KINDS)
    if unknown:
        raise ValueError(f"unknown mask kinds {sorted(unknown)}; known kinds: {', '.join(MASK_KINDS)}.")


def validate_masks(model: nn.Module | BoundModel, masks: Masks) -> Masks:
    """Check kinds, shapes and that something sensible survives; return the masks as CPU bool tensors."""
    _check_kinds(masks)
    bound = bind(model)
    counts = bound.unit_counts()
    full = _full_masks(counts)
    full["head_dims"] = torch.ones(
        counts["layers"], max(counts["heads"]), counts["head_size"], dtype=torch.bool
    )
    clean: Masks = {}
    for kind, mask in masks.items():
        mask = torch.as_tensor(mask).detach().to("cpu")
        if mask.dtype != torch.bool:
            raise ValueError(f"masks[{kind!r}] must be a bool tensor (True keeps a unit), got {mask.dtype}.")
        if kind == "head_dims" and mask.dim() == 2:  # one choice for every head of a layer
            mask = mask[:, None, :].expand(-1, full[kind].shape[1], -1)
        if mask.shape != full[kind].shape:
            raise ValueError(
                f"masks[{kind!r}] has shape {tuple(mask.shape)}, but this model needs {tuple(full[kind].shape)}."
            )
        clean[kind] = mask & full[kind]
    layers = clean.get("layers", full["layers"])
    if not layers.any():
        raise ValueError("the masks remove every layer; keep at least one (masks['layers']).")
    if "hidden" in clean and not clean["hidden"].any():
        raise ValueError("the masks remove every hidden dimension; keep at least one.")
    for kind, what in (("heads", "attention head"), ("ffn", "FFN neuron"), ("head_dims", "head dimension")):
        if kind not in clean:
            continue
        empty = [i for i in range(counts["layers"]) if layers[i] and not clean[kind][i].any()]
        if empty:
            raise ValueError(
                f"the masks remove every {what} of layer(s) {empty}. A block cannot run without them: "
                f"remove those layers instead (masks['layers'][i] = False) or keep at least one {what}."
            )
    if "head_dims" in clean:
        kept_heads = clean.get("heads", full["heads"])
        widths = {
            int(clean["head_dims"][i, h].sum())
            for i in range(counts["layers"])
            if layers[i]
            for h in range(counts["heads"][i])
            if kept_heads[i, h]
        }
        if len(widths) > 1:
            raise ValueError(
                f"every kept head must keep the same number of dimensions (one head size), got "
                f"{sorted(widths)}."
            )
    if "head_dims" in clean and bound.queries_per_unit() > 1 and not clean["head_dims"].all():
        raise ValueError(
            "under grouped-query attention a unit is a key/value group with its query heads, which all keep the "
            "head size: remove whole groups (masks['heads']) instead of narrowing heads."
        )
    if "head_dims" in clean and bound.adapter.rotary and not clean["head_dims"].all():
        raise ValueError(
            f"{type(bound.model).__name__} rotates each head's dimensions in pairs at frequencies its config "
            "derives from the head size, so heads cannot be narrowed: remove whole heads instead (fewer "
            "num_attention_heads at the teacher's head size)."
        )
    encoder = bound.encoder()
    if getattr(encoder, "conv", None) is not None and not layers[0]:
        raise ValueError(
            "this DeBERTa model applies its convolution after the first layer; removing layer 0 would move it. "
            "Keep layer 0 (masks['layers'][0] = True)."
        )
    return clean


def kept_index(axis: Axis, masks: Masks, counts: dict) -> torch.Tensor | None:
    """Indices along ``axis`` that survive ``masks``, or None when the axis is untouched."""
    kept = _kept_in_block(axis, masks, counts)
    if kept is None or axis.blocks == 1:
        return kept
    width = axis.parameter.shape[axis.dim] // axis.blocks
    return torch.cat([kept + block * width for block in range(axis.blocks)])


def _kept_in_block(axis: Axis, masks: Masks, counts: dict) -> torch.Tensor | None:
    if axis.kind == "hidden":
        return masks["hidden"].nonzero().flatten() if "hidden" in masks else None
    if axis.kind == "ffn":
        if "ffn" not in masks:
            return None
        return masks["ffn"][axis.layer, : counts["ffn"][axis.layer]].nonzero().flatten()
    if "heads" not in masks and "head_dims" not in masks:
        return None
    head_size = counts["head_size"]
    heads = counts["heads"][axis.layer]
    keep_heads = (
        masks["heads"][axis.layer, :heads] if "heads" in masks else torch.ones(heads, dtype=torch.bool)
    )
    keep_dims = (
        masks["head_dims"][axis.layer, :heads]
        if "head_dims" in masks
        else torch.ones(heads, head_size, dtype=torch.bool)
    )
    width = axis.unit_width or head_size
    if width != head_size:  # a key/value group's query heads: the unit goes whole (head_dims are refused)
        return keep_heads.repeat_interleave(width).nonzero().flatten()
    grid = keep_heads[:, None] & keep_dims
    return grid.flatten().nonzero().flatten()


def removed_index(axis: Axis, masks: Masks, counts: dict) -> torch.Tensor | None:
    kept = kept_index(axis, masks, counts)
    if kept is None:
        return None
    removed = torch.ones(axis.parameter.shape[axis.dim], dtype=torch.bool)
    removed[kept] = False
    return removed.nonzero().flatten()


def masked_parameter_slices(model: nn.Module | BoundModel, masks: Masks) -> list[ParameterSlice]:
    """Where the weights of removed units live, so gradients and optimizer state can be zeroed the same way.

    Entries for a removed layer cover the whole parameter (``dim=0``, every index).
    """
    bound = bind(model)
    masks = validate_masks(bound, masks)
    counts = bound.unit_counts()
    slices = []
    for axis in axes(bound):
        index = removed_index(axis, masks, counts)
        if index is not None and index.numel():
            slices.append(ParameterSlice(axis.name, axis.parameter, axis.dim, index))
    if "layers" in masks:
        for i, named in enumerate(layer_parameters(bound)):
            if not masks["layers"][i]:
                for name, parameter in named:
                    slices.append(ParameterSlice(name, parameter, 0, torch.arange(parameter.shape[0])))
    return slices


@torch.no_grad()
def zero_masked_(model: nn.Module | BoundModel, masks: Masks) -> None:
    """Set the weights of every removed unit to zero, in place."""
    for piece in masked_parameter_slices(model, masks):
        piece.parameter.index_fill_(piece.dim, piece.index.to(piece.parameter.device), 0.0)


class MaskHandle:
    """Hooks that make a model behave as if pruned; ``remove()`` (or leaving the ``with`` block) undoes it."""

    def __init__(self, handles: list) -> None:
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> MaskHandle:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.remove()


def _scale_input(scale: torch.Tensor):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (args[0] * scale.to(args[0]), *args[1:])

    return hook


def _scale_output(scale: torch.Tensor):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * scale.to(output)

    return hook


def _norm_over(kept: torch.Tensor):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        index = kept.to(output.device)
        normed = normalize_kept(module, args[0].index_select(-1, index), index)
        return torch.zeros_like(output).index_copy(-1, index, normed.to(output.dtype))

    return hook


def normalize_kept(norm: nn.Module, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """What ``norm`` computes on the hidden dimensions ``index`` alone (``hidden`` holds only those).

    LayerNorm (with or without bias), ``nn.RMSNorm`` and the RMSNorms of transformers' decoder families
    (a ``weight`` and a ``variance_epsilon``, computed in float32) are known; others are refused by name.
    """
    weight = getattr(norm, "weight", None)
    weight = weight[index] if weight is not None else None
    if isinstance(norm, nn.LayerNorm):
        bias = norm.bias[index] if norm.bias is not None else None
        return F.layer_norm(hidden, (len(index),), weight, bias, norm.eps)
    if isinstance(norm, nn.RMSNorm):
        return F.rms_norm(hidden, (len(index),), weight, norm.eps)
    epsilon = getattr(norm, "variance_epsilon", None)
    if epsilon is not None and weight is not None:
        variance = hidden.float().pow(2).mean(-1, keepdim=True)
        return weight * (hidden.float() * torch.rsqrt(variance + epsilon)).to(hidden.dtype)
    raise TypeError(
        f"lightning-kd cannot mask hidden dimensions through a {type(norm).__name__}: it knows LayerNorm and "
        "RMSNorm. Leave hidden dimensions unpruned for this model, or add the norm to units.normalize_kept."
    )


def _skip_layer(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


def _hidden_modules(bound: BoundModel) -> tuple[list, list, list, list]:
    parts = bound.hidden_parts()
    readers, writers, norms = list(parts.readers), list(parts.writers), list(parts.norms)
    for layer in bound.layers():
        p = bound.layer_parts(layer)
        readers += [*p.head_projections, *p.ffn_inputs]
        writers += [p.attention_output, p.ffn_output]
        norms += p.norms
    return readers, writers, norms, parts.convs


def _first_kept_block_hook(bound: BoundModel, layers: torch.Tensor) -> list:
    """Where the first block has no attention norm and masks remove it, the first kept block loses its
    attention norm when pruned (as the config builds a first block): the masked model passes its input
    through that norm unchanged, so both compute the same."""
    if not bound.adapter.first_block_without_attention_norm or bool(layers[0]):
        return []
    first = int(layers.nonzero()[0])
    norm = bound.layer_parts(bound.layers()[first]).attention_norm
    if norm is None:
        return []
    return [norm.register_forward_hook(lambda _module, args, _output: args[0])]


def apply_masks(model: nn.Module | BoundModel, masks: Masks) -> MaskHandle:
    """Make ``model`` compute what ``prune_model(model, masks)`` computes, through removable hooks."""
    bound = bind(model)
    masks = validate_masks(bound, masks)
    if "head_dims" in masks:
        raise ValueError("head_dims narrows heads and changes their temperature; use prune_model for it.")
    counts = bound.unit_counts()
    handles = []
    layers = bound.layers()
    # the hooks run on every forward: put the masks where the weights are once, not at every call
    device = next(bound.model.parameters()).device
    masks = {kind: mask.to(device) for kind, mask in masks.items()}
    for i, layer in enumerate(layers):
        parts = bound.layer_parts(layer)
        if "heads" in masks:
            width = counts["head_size"] * parts.query_heads_per_unit
            keep = masks["heads"][i, : counts["heads"][i]].float().repeat_interleave(width)
            handles.append(parts.attention_output.register_forward_pre_hook(_scale_input(keep)))
        if "ffn" in masks:
            keep = masks["ffn"][i, : counts["ffn"][i]].float()
            handles.append(parts.ffn_output.register_forward_pre_hook(_scale_input(keep)))
        if "layers" in masks and not masks["layers"][i]:
            handles.append(layer.register_forward_hook(_skip_layer, with_kwargs=True))
    if "hidden" in masks and not masks["hidden"].all():
        keep = masks["hidden"].float()
        readers, writers, norms, convs = _hidden_modules(bound)
        handles += [m.register_forward_pre_hook(_scale_input(keep)) for m in readers]
        handles += [m.register_forward_hook(_scale_output(keep)) for m in writers]
        handles += [m.register_forward_hook(_norm_over(masks["hidden"].nonzero().flatten())) for m in norms]
        channel = keep[:, None]  # Conv1d sees (batch, hidden, sequence)
        handles += [m.register_forward_pre_hook(_scale_input(channel)) for m in convs]
        handles += [m.register_forward_hook(_scale_output(channel)) for m in convs]
    if "layers" in masks:
        handles += _first_kept_block_hook(bound, masks["layers"])  # last, so it overrides the norm's own hook
    return MaskHandle(handles)


@contextmanager
def masked(model: nn.Module | BoundModel, masks: Masks) -> Iterator[nn.Module]:
    """``with masked(model, masks): model(...)`` runs the model as if pruned."""
    bound = bind(model)
    handle = apply_masks(bound, masks)
    try:
        yield bound.model
    finally:
        handle.remove()
