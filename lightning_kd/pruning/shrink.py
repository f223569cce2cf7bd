"""Shrinking a model while it trains: what follows its parameters when ``prune_model_`` replaces them.

``prune_model_`` removes units in place and says which parameter became which slice of which (``Resize``).
This module carries everything laid out like those parameters along: optimizer state (``reindex_optimizer_``,
on ``move_optimizer_state_``, which FSDP2's gather and re-shard in ``training/sharded_surgery.py`` use too),
the parameters of other modules that read the model's hidden width (``follow_width``), and, when a run asks for
it (``PruningCallback(align_dropout=True)``), the dropout of the residual stream (``WideDropout``), which keeps
drawing its random mask at the width the model started with, so that a shrunk model draws exactly the masks its
masked twin draws.

Masks here come in two coordinate systems. A run keeps its decisions in *full* coordinates (the shape the
model started with); the model in front of it is already smaller, so surgery needs masks *relative* to the
current shape: ``relative_masks(new, old)`` converts, ``expand_scores`` goes the other way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from lightning_kd.models.bound import BoundModel, bind
from lightning_kd.pruning.prune import Resize, prune_model_
from lightning_kd.pruning.units import Masks, _ragged, unit_counts


def _ragged_like(mask: torch.Tensor) -> torch.Tensor:
    """Where the kept units of ``mask`` sit once the model holds only them: the first ``k`` slots of each row."""
    if mask.ndim == 1:
        return torch.ones(int(mask.sum()), dtype=torch.bool)
    return _ragged([int(k) for k in mask.sum(-1)])


def relative_masks(new: Masks, old: Masks) -> Masks:
    """``new`` (full coordinates) over a model that already holds only the units of ``old`` (full too)."""
    relative = {}
    for kind, mask in new.items():
        if (mask & ~old[kind]).any():
            raise ValueError(
                f"the new {kind} mask revives units an earlier event removed; units stay removed."
            )
        slots = _ragged_like(old[kind])
        out = torch.zeros_like(slots)
        out[slots] = mask[old[kind]]
        relative[kind] = out
    return relative


def expand_scores(values: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Scores of a shrunk model (its units in order) put back at the full-coordinate positions ``kept``.

    Removed positions get -inf: they rank below every unit that still exists.
    """
    out = torch.full(kept.shape, -torch.inf, dtype=values.dtype)
    out[kept] = values.cpu()[_ragged_like(kept)]
    return out


def shape_masks(model: nn.Module | BoundModel, counts: Mapping[str, Iterable[int] | int]) -> Masks:
    """Masks that keep the first units of each kind, as many as ``counts`` gives (per layer for heads/FFN).

    A checkpoint of a shrunk model holds its shapes, not which of the current units are which: pruning to
    ``shape_masks`` rebuilds those shapes, and loading the checkpoint's weights then fills them.
    """
    current = unit_counts(model)
    masks: Masks = {}
    for kind, want in counts.items():
        if kind == "hidden":
            if int(want) > current["hidden"]:
                raise ValueError(
                    f"the checkpoint's student is {want} wide, wider than this model ({current['hidden']})."
                )
            masks["hidden"] = torch.arange(current["hidden"]) < int(want)
            continue
        want = [int(k) for k in want]
        have = current[kind]
        if len(want) != len(have) or any(w > h for w, h in zip(want, have, strict=True)):
            raise ValueError(
                f"the checkpoint's student keeps {kind} {want} per layer, which this model "
                f"({have}) cannot hold: load it into the model the run started from."
            )
        masks[kind] = torch.arange(max(have))[None, :] < torch.tensor(want)[:, None]
    return masks


def student_shape(model: nn.Module | BoundModel) -> dict[str, list[int] | int]:
    """What ``shape_masks`` needs to rebuild this model's shapes: heads and FFN neurons per layer, width."""
    counts = unit_counts(model)
    return {"heads": list(counts["heads"]), "ffn": list(counts["ffn"]), "hidden": int(counts["hidden"])}


@torch.no_grad()
def move_optimizer_state_(
    optimizer: torch.optim.Optimizer,
    replacements: Mapping[int, nn.Parameter | None],
    convert: Callable[[torch.Tensor, nn.Parameter, nn.Parameter], torch.Tensor],
) -> None:
    """Point ``optimizer`` at replacement parameters, their state carried along.

    ``replacements`` maps an old parameter's ``id`` to the parameter taking its place, or to None for one that
    leaves the optimizer with its state; the others stay. A state tensor shaped like the old parameter (Adam's
    moments, SGD's momentum) becomes ``convert(value, old, new)``; step counts and other scalars carry over.
    """
    for group in optimizer.param_groups:
        params = []
        for parameter in group["params"]:
            if id(parameter) not in replacements:
                params.append(parameter)
                continue
            new = replacements[id(parameter)]
            state = optimizer.state.pop(parameter, None)
            if new is None:
                continue
            if state is not None:
                optimizer.state[new] = {
                    key: convert(value, parameter, new)
                    if isinstance(value, torch.Tensor) and value.shape == parameter.shape
                    else value
                    for key, value in state.items()
                }
            params.append(new)
        group["params"] = params


def reindex_optimizer_(
    optimizer: torch.optim.Optimizer, resizes: Iterable[Resize], removed: Iterable[nn.Parameter] = ()
) -> None:
    """Point ``optimizer`` at the new parameters, its per-parameter state sliced with the same indices.

    Works for any optimizer whose state is tensors shaped like the parameter plus scalars (Adam, AdamW, fused
    or foreach, SGD momentum, ...): moments follow the kept units, step counts continue. ``removed``
    parameters (those of removed layers) leave the optimizer with their state.
    """
    changes = {id(r.old): r for r in resizes}

    def kept(value: torch.Tensor, old: nn.Parameter, new: nn.Parameter) -> torch.Tensor:
        for dim, index in changes[id(old)].index.items():
            value = value.index_select(dim, index.to(value.device))
        return value

    replacements: dict[int, nn.Parameter | None] = {key: r.new for key, r in changes.items()}
    replacements.update({id(p): None for p in removed})
    move_optimizer_state_(optimizer, replacements, kept)


def follow_width(
    before: Mapping[str, nn.Parameter], after: Mapping[str, nn.Parameter], kept: torch.Tensor
) -> list[Resize]:
    """Resizes of a module that reads the model's hidden width (an objective's projections) after it narrowed.

    ``before``/``after`` are its named parameters around the narrowing; a dimension that shrank kept the
    entries ``kept``, one that did not keeps all; parameters that are new (a fixed map that replaced an
    identity) have no past to carry.
    """
    resizes = []
    for name, old in before.items():
        new = after.get(name)
        if new is None or new is old:
            continue
        if new.ndim != old.ndim:
            raise ValueError(
                f"{name} changed rank while narrowing ({tuple(old.shape)} -> {tuple(new.shape)})."
            )
        index = {}
        for dim, (was, now) in enumerate(zip(old.shape, new.shape, strict=True)):
            if was != now:
                if now != len(kept):
                    raise ValueError(
                        f"{name} went from {was} to {now} along dim {dim}, but the model kept "
                        f"{len(kept)} of its hidden dimensions."
                    )
                index[dim] = kept
        resizes.append(Resize(old, new, index))
    return resizes


class WideDropout(nn.Module):
    """Dropout on the residual stream that draws its mask at the width the model started with.

    Keeping the draw at full width means a shrunk model consumes the random stream exactly as the masked
    model does, and each kept dimension gets the bit it would have had: a shrunk run and its masked twin stay
    equal with dropout on. Tensors of another width (none in BERT) get ordinary dropout.
    """

    def __init__(self, p: float, full_width: int, kept: torch.Tensor) -> None:
        super().__init__()
        self.p, self.full_width = p, full_width
        self.register_buffer("kept", kept.clone(), persistent=False)  # not part of the model's weights

    @override
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return hidden
        if hidden.shape[-1] != self.kept.numel() or self.p >= 1.0:
            return F.dropout(hidden, self.p, True)
        # what F.dropout does on the CPU at full width (bernoulli then scale), then the kept columns
        noise = torch.empty((*hidden.shape[:-1], self.full_width), dtype=hidden.dtype, device=hidden.device)
        noise.bernoulli_(1 - self.p).div_(1 - self.p)
        return hidden * noise.index_select(-1, self.kept.to(hidden.device))

    @override
    def extra_repr(self) -> str:
        return f"p={self.p}, kept={self.kept.numel()} of {self.full_width}"


def _stream_dropouts(bound: BoundModel) -> list[tuple[nn.Module, str, nn.Module]]:
    """Every dropout of the model except attention-probability ones, as (parent, attribute, module)."""
    dropouts = (bound.adapter.attention_dropout(layer) for layer in bound.layers())
    attention = {id(dropout) for dropout in dropouts if dropout is not None}
    found = []
    for parent in bound.model.modules():
        for name, child in parent.named_children():
            if isinstance(child, (nn.Dropout, WideDropout)) and id(child) not in attention:
                found.append((parent, name, child))
    return found


def widen_dropout_(model: nn.Module | BoundModel, full_width: int, kept: torch.Tensor) -> None:
    """Make the residual-stream dropouts of ``model`` draw at ``full_width`` and keep the columns ``kept``."""
    bound = bind(model)
    device = next(bound.model.parameters()).device
    for parent, name, child in _stream_dropouts(bound):
        wide = WideDropout(child.p, full_width, kept.to(device))
        wide.train(child.training)
        setattr(parent, name, wide)


def plain_dropout_(model: nn.Module | BoundModel) -> None:
    """Put ordinary ``nn.Dropout`` back, so the finished model is plain transformers throughout."""
    for parent, name, child in _stream_dropouts(bind(model)):
        if isinstance(child, WideDropout):
            plain = nn.Dropout(child.p)
            plain.train(child.training)
            setattr(parent, name, plain)


def rebuild_shape_(
    model: nn.Module | BoundModel, shape: Mapping[str, Iterable[int] | int]
) -> torch.Tensor | None:
    """Shrink ``model`` in place to ``shape`` (``student_shape`` of a shrunk model) before its weights load.

    Returns the hidden dimensions kept (the first ones) when the width changed, so modules that read the
    width can follow, else None. A model already of that shape is left alone.
    """
    bound = bind(model)
    if student_shape(bound) == {k: (list(v) if k != "hidden" else int(v)) for k, v in shape.items()}:
        return None
    masks = shape_masks(bound, shape)
    prune_model_(bound, masks)
    hidden = masks["hidden"]
    return hidden.nonzero().flatten() if not hidden.all() else None
