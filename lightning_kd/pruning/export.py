"""Saving pruned students so that plain transformers loads them, and loading them back small.

A config has one ``num_attention_heads`` and one ``intermediate_size`` for all layers, and BERT derives the
head size as ``hidden_size / num_attention_heads``. A pruned model that does not fit is padded, in a way
that computes the same function:

- layers with fewer heads or FFN neurons than the widest layer get extra heads / neurons whose weights are
  zero: a zero head's value and output weights are zero, so it adds nothing; a zero neuron's output
  column is zero, so it adds nothing whatever its activation;
- on BERT and RoBERTa, when ``hidden_size / num_attention_heads`` is not the head size, heads are first
  padded with zero heads up to ``hidden_size / head_size``; when that is not a whole number, every head
  is padded with zero dimensions to the nearest head size that fits, and the queries are scaled by
  ``sqrt(new / old head size)`` so that ``q.k / sqrt(head size)`` is unchanged.

The true per-layer sizes are written into ``config.lightning_kd`` (plain transformers keeps it as an unused
attribute). ``load_pruned`` reads them and removes the padding again, so the model is small in memory.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import AutoModel, PreTrainedModel

from lightning_kd.files import atomic_folder
from lightning_kd.models.adapter import ArchitectureAdapter, LayerParts, query_rescale
from lightning_kd.models.bound import BoundModel, bind, try_bind, unbind
from lightning_kd.pruning.prune import _refresh_shape, prune_model
from lightning_kd.training.sharding import sum_over_ranks

RECORD_KEY = "lightning_kd"


def _config_head_layout(
    adapter: ArchitectureAdapter, hidden: int, heads: int, head_size: int
) -> tuple[int, int]:
    """(num_attention_heads, head size) that a standard config can express and that hold the kept heads."""
    if adapter.free_head_size or heads * head_size == hidden:
        return heads, head_size
    if hidden % head_size == 0 and hidden // head_size >= heads:
        return hidden // head_size, head_size
    if adapter.rotary:
        # padding each head with zero dimensions would change the rotary frequencies of the real ones
        fits = hidden // head_size
        raise ValueError(
            f"this architecture derives the head size as hidden_size / num_attention_heads and rotates heads at "
            f"frequencies set by it, so {heads} heads of size {head_size} cannot be saved with hidden size "
            f"{hidden}: keep the hidden size a multiple of {head_size} with at least {heads} heads' worth "
            f"(e.g. {max(heads, -(-hidden // head_size)) * head_size}), or keep at most {fits} heads per layer."
        )
    for count in range(heads, hidden // head_size + 1):
        if hidden % count == 0:
            return count, hidden // count
    fits = hidden // head_size
    raise ValueError(
        f"this architecture derives the head size as hidden_size / num_attention_heads, so {heads} heads of "
        f"size {head_size} cannot be saved with hidden size {hidden} (at most {fits} heads of that size fit). "
        f"Keep at most {fits} heads per layer, or keep more hidden dimensions "
        f"(at least {heads * head_size})."
    )


def _pad_rows(
    weight: torch.Tensor, groups: int, width: int, new_groups: int, new_width: int, blocks: int = 1
) -> torch.Tensor:
    """Zero-pad dim 0 laid out as ``blocks x groups x width`` to ``blocks x new_groups x new_width`` (a fused
    map pads each of its blocks)."""
    rest = weight.shape[1:]
    padded = weight.new_zeros(blocks, new_groups, new_width, *rest)
    padded[:, :groups, :width] = weight.reshape(blocks, groups, width, *rest)
    return padded.reshape(blocks * new_groups * new_width, *rest)


def _pad_columns(
    weight: torch.Tensor, groups: int, width: int, new_groups: int, new_width: int
) -> torch.Tensor:
    return _pad_rows(weight.t(), groups, width, new_groups, new_width).t().contiguous()


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))


def _unit_layout(
    parts: LayerParts, units: int, head_size: int, new_units: int, new_head_size: int, linear: nn.Linear
) -> tuple[int, int, int, int]:
    """(units, rows per unit) of ``linear`` now and in the padded layout."""
    return (
        units,
        parts.rows_per_unit(linear, head_size),
        new_units,
        parts.rows_per_unit(linear, new_head_size),
    )


@torch.no_grad()
def to_standard(model: nn.Module | BoundModel) -> nn.Module:
    """A copy of ``model`` whose every layer matches one standard config (zero-padded where needed)."""
    bound = bind(model)
    adapter = bound.adapter
    counts = bound.unit_counts()
    hidden, head_size = counts["hidden"], counts["head_size"]
    heads, ffn = counts["heads"], counts["ffn"]
    num_heads, new_head_size = _config_head_layout(adapter, hidden, max(heads), head_size)
    width = max(ffn)
    padded = bound.on(copy.deepcopy(bound.model))
    queries = bound.queries_per_unit()  # query heads per unit: units are key/value groups under GQA
    for i, layer in enumerate(padded.layers()):
        parts = adapter.layer_parts(layer)
        shape = partial(_unit_layout, parts, heads[i], head_size, num_heads, new_head_size)
        if (heads[i], head_size) != (num_heads, new_head_size):
            for projection in parts.head_projections:
                scale = parts.query_scale(projection, query_rescale(head_size, new_head_size))
                row_scale = scale[:, None] if isinstance(scale, torch.Tensor) else scale
                blocks = parts.blocks(projection)
                _set(
                    projection, "weight", _pad_rows(projection.weight * row_scale, *shape(projection), blocks)
                )
                if projection.bias is not None:
                    _set(projection, "bias", _pad_rows(projection.bias * scale, *shape(projection), blocks))
            output = parts.attention_output
            _set(output, "weight", _pad_columns(output.weight, *shape(output)))
        if ffn[i] != width:
            ffn_shape = (ffn[i], 1, width, 1)
            for ffn_input in parts.ffn_inputs:
                blocks = parts.blocks(ffn_input)
                _set(ffn_input, "weight", _pad_rows(ffn_input.weight, *ffn_shape, blocks))
                if ffn_input.bias is not None:
                    _set(ffn_input, "bias", _pad_rows(ffn_input.bias, *ffn_shape, blocks))
            _set(parts.ffn_output, "weight", _pad_columns(parts.ffn_output.weight, *ffn_shape))
        for module in layer.modules():
            _refresh_shape(module)
        adapter.set_attention_shape(layer, num_heads * queries, new_head_size)
    config = padded.config()
    adapter.update_config(
        config,
        hidden=hidden,
        heads=num_heads * queries,
        head_size=new_head_size,
        intermediate=width,
        layers=len(heads),
    )
    padding = (num_heads, new_head_size, width) != (max(heads), head_size, width) or len(set(heads)) > 1
    if padding or len(set(ffn)) > 1:
        setattr(config, RECORD_KEY, {"heads": list(heads), "intermediate": list(ffn), "head_size": head_size})
    elif hasattr(config, RECORD_KEY):
        delattr(config, RECORD_KEY)
    return padded.model


def check_exportable(model: nn.Module | BoundModel, hidden: int, heads: int) -> None:
    """Raise now, with the export's own message, if ``model`` pruned to ``hidden`` dimensions and ``heads``
    heads per layer could not be saved with a standard config (so a long run does not fail at its end)."""
    bound = bind(model)
    _config_head_layout(bound.adapter, hidden, heads, bound.head_size())


def check_export_dir(path: str | os.PathLike) -> Path:
    """Raise now, naming the fix, if a model could not be saved as folder ``path`` at the end of a run.

    Called when fit starts by everything that exports when it ends, so a long run does not end in a save that
    cannot happen (``save_pretrained`` on an existing file logs an error and writes nothing).
    """
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(
            f"cannot export to {target}: it is a file, and a model is saved as a folder. Name a "
            "folder (it is created when missing), or move the file away."
        )
    ancestor = target
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(
            f"cannot export to {target}: {ancestor} is a file, so no folder can be made below it. "
            "Name a folder path whose parents are folders."
        )
    try:
        with tempfile.NamedTemporaryFile(dir=ancestor, prefix=".lightning-kd-write-test-"):
            pass
    except OSError as error:
        raise ValueError(
            f"cannot export to {target}: nothing can be written in {ancestor} ({error.strerror}). "
            "Name a folder on a writable file system, or fix its permissions."
        ) from error
    return target


# the files of a saved model's weights, which a new export replaces as a whole (shards included)
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def check_export_written(path: str | os.PathLike) -> None:
    """Raise ``OSError`` unless ``path`` holds a saved model (its config and weights)."""
    folder = Path(path)
    weights = [p for pattern in WEIGHT_FILES for p in folder.glob(pattern)]
    if not (folder / "config.json").is_file() or not weights:
        raise OSError(f"the model was not written to {folder}: its config.json or weights are missing.")


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of ``model``'s floating-point parameters holding an inf or a NaN (one device sync)."""
    named = [(n, p.detach()) for n, p in model.named_parameters() if p.is_floating_point()]
    if not named:
        return []
    # FSDP2: each rank checks its shards, and the ranks agree on the verdict, so they all raise or none does
    sharded = [p for _, p in named if isinstance(p, DTensor)]
    local = [p.to_local() if isinstance(p, DTensor) else p for _, p in named]
    bad = {"bad": (~torch.isfinite(torch.stack(torch._foreach_norm(local, ord=float("inf"))))).float()}
    sum_over_ranks(bad, sharded)
    finite = bad["bad"] == 0
    if bool(finite.all()):
        return []
    return [name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def export_pretrained(
    model: nn.Module | BoundModel,
    path: str | os.PathLike,
    label_names: Sequence[str] | None = None,
    **save_kwargs: Any,
) -> Path:
    """``save_pretrained`` for a pruned model; the folder loads with plain ``AutoModel.from_pretrained``.

    ``label_names`` (a classifier's classes in id order) become the config's ``id2label``/``label2id``, so
    pipelines print ``entailment`` rather than ``LABEL_0``. The model's own config is left as it was. A model
    with non-finite weights is refused: an all-NaN folder looks like a student and is not one.
    """
    with atomic_folder(path, "model folder", replaces=WEIGHT_FILES) as staging:
        save_standard(model, staging, label_names, **save_kwargs)
    return Path(path)


def save_standard(
    model: nn.Module | BoundModel,
    path: str | os.PathLike,
    label_names: Sequence[str] | None = None,
    **save_kwargs: Any,
) -> tuple[int, int]:
    """:func:`export_pretrained`, returning (parameters of ``model``, parameters plain transformers loads).

    The two differ when layers were pruned to different widths: plain transformers has one width for every
    layer, so the narrower ones are zero-padded to the widest (:func:`load_pruned` removes the padding).
    """
    module = unbind(model)
    if not isinstance(module, PreTrainedModel):
        raise TypeError(
            f"export_pretrained needs a transformers PreTrainedModel, got {type(module).__name__}."
        )
    bad = nonfinite_parameters(module)
    if bad:
        raise ValueError(
            f"not exporting to {path}: {len(bad)} parameters are not finite (first "
            f"{', '.join(bad[:3])}); the run that trained this model diverged."
        )
    bound = try_bind(model)
    # an architecture lightning-kd cannot prune is never padded: saved as it is
    standard = copy.deepcopy(module) if bound is None else to_standard(bound)
    if label_names:
        num_labels = getattr(standard.config, "num_labels", None)
        if num_labels != len(label_names):
            raise ValueError(
                f"{len(label_names)} label names {list(label_names)} for a model with {num_labels} "
                "labels: pass the task's own label names"
            )
        standard.config.id2label = dict(enumerate(label_names))
        standard.config.label2id = {name: i for i, name in enumerate(label_names)}
    standard.save_pretrained(path, **save_kwargs)
    return parameter_count(module), parameter_count(standard)


def load_pruned(path: str | os.PathLike, model_class: Any = AutoModel, **kwargs: Any) -> nn.Module:
    """Load an exported student and remove the zero padding that ``export_pretrained`` added, if any."""
    if not hasattr(model_class, "from_pretrained"):
        raise TypeError(f"model_class must be a transformers class such as AutoModel, got {model_class!r}.")
    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"no exported student at {path}: load_pruned reads a folder written by "
            "export_pretrained (or DistillationReport / PruningCallback's export_dir)."
        )
    model = model_class.from_pretrained(path, **kwargs)
    record = getattr(model.config, RECORD_KEY, None)
    if not record:
        return model
    bound = bind(model)
    counts = bound.unit_counts()
    layers = counts["layers"]
    heads = torch.zeros(layers, max(counts["heads"]), dtype=torch.bool)
    ffn = torch.zeros(layers, max(counts["ffn"]), dtype=torch.bool)
    for i in range(layers):
        heads[i, : record["heads"][i]] = True
        ffn[i, : record["intermediate"][i]] = True
    head_dims = torch.zeros(layers, counts["head_size"], dtype=torch.bool)
    head_dims[:, : record["head_size"]] = True
    small = prune_model(bound, {"heads": heads, "ffn": ffn, "head_dims": head_dims})
    delattr(small.config, RECORD_KEY)
    return small
