"""What an artifact was made from, recorded in it and checked when it is read: one fingerprint for a model,
one record for a model and for a tokenizer, and one refusal that names both models and the fix.

TED filters, checkpoints and teacher caches carry these records (under ``made_with``); prepared data carries its
tokenizer's (``prepare.json`` and ``manifest.json``). An artifact written before the records existed has none
and is read as before.

The fingerprint is cheap enough to take at every checkpoint: it hashes every tensor's name, shape and dtype and
a strided sample of at most :data:`SAMPLES` of its values, not the whole weights (a 7B model's 14 GB would take
tens of seconds). Training or fine-tuning moves nearly every value of every tensor, so two models that differ
anywhere that matters differ in the sample. Sharded tensors (FSDP2's ``DTensor``) contribute their global shape
only: sampling them would need every rank's shard.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

SAMPLES = 64  # values hashed per tensor


class ArtifactMismatch(ValueError):
    """An artifact made for another model than the one reading it."""


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of ``model``'s tensors: names, shapes, dtypes and a strided sample of each one's values.

    Equal for the same weights however they were loaded; different for another model of the same shape (another
    fine-tuning, another seed), and for the same model in another dtype."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper prefixes every name
    digest = hashlib.sha1()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            if type(tensor).__name__ == "DTensor" or tensor.numel() == 0:
                continue
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // SAMPLES)][:SAMPLES]
            digest.update(sample.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def model_record(model: nn.Module) -> dict[str, Any]:
    """What identifies ``model`` to a reader and to a person: its source, class, shape and fingerprint."""
    model = getattr(model, "_orig_mod", model)
    config = getattr(model, "config", None)
    first = next((t for t in model.state_dict().values() if t.is_floating_point()), None)
    return {
        "name": str(getattr(config, "_name_or_path", "") or ""),
        "class": type(model).__name__,
        "layers": getattr(config, "num_hidden_layers", None),
        "hidden": getattr(config, "hidden_size", None),
        "labels": _labels(model),
        "dtype": str(first.dtype) if first is not None else None,
        "fingerprint": model_fingerprint(model),
    }


def tokenizer_record(tokenizer: Any) -> dict[str, Any] | None:
    """The tokenizer's name and vocabulary hash (the token -> id table), or ``None`` without a tokenizer."""
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return None
    from lightning_kd.datamodules.common import vocabulary_hash

    return {
        "name": str(getattr(tokenizer, "name_or_path", "") or ""),
        "vocab_hash": vocabulary_hash(tokenizer),
    }


def describe(record: Mapping[str, Any]) -> str:
    """``'runs/teacher' (BertForSequenceClassification, 12 layers x 768, 3 labels, fingerprint 1a2b...)``."""
    shape = [record.get("class") or "a model"]
    if record.get("layers") is not None:
        shape.append(f"{record['layers']} layers x {record.get('hidden')}")
    if record.get("labels") is not None:
        shape.append(f"{record['labels']} labels")
    if record.get("fingerprint"):
        shape.append(f"fingerprint {record['fingerprint']}")
    name = repr(record["name"]) if record.get("name") else "a model"
    return f"{name} ({', '.join(str(s) for s in shape)})"


def same_model(saved: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether two records name the same model. Across dtypes (a teacher loaded in bfloat16 for one run and
    float32 for another) the values differ in every bit, so only the shape is compared there."""
    for key in ("class", "layers", "hidden", "labels"):
        if saved.get(key) is not None and current.get(key) is not None and saved[key] != current[key]:
            return False
    if saved.get("dtype") != current.get("dtype"):
        return True
    return saved.get("fingerprint") == current.get("fingerprint")


def check_made_with(
    saved: Mapping[str, Any] | None,
    model: nn.Module,
    what: str,
    path: str | os.PathLike,
    fix: str,
) -> None:
    """Refuse the ``what`` at ``path`` if its record ``saved`` names another model than ``model``, naming both
    and ``fix``; an artifact without a record (written before records existed) passes."""
    if not saved:
        return
    current = model_record(model)
    if not same_model(saved, current):
        raise ArtifactMismatch(
            f"{what} at {path}: made with {describe(saved)}, but this run has {describe(current)}. {fix}"
        )


def check_same_tokenizer(
    saved: Mapping[str, Any] | None, tokenizer: Any, what: str, path: str | os.PathLike, fix: str
) -> None:
    """Refuse the ``what`` at ``path`` if it was made with another token -> id table than ``tokenizer``'s."""
    current = tokenizer_record(tokenizer)
    if not saved or current is None or saved.get("vocab_hash") == current["vocab_hash"]:
        return
    raise ArtifactMismatch(
        f"{what} at {path}: made with the tokenizer {saved.get('name')!r} (vocabulary {saved.get('vocab_hash')}), "
        f"but this run's is {current['name']!r} (vocabulary {current['vocab_hash']}): the same ids would mean "
        f"other tokens. {fix}"
    )


def run_tokenizer(module: Any) -> Any:
    """The tokenizer of the data ``module`` runs on (its Trainer's DataModule's), or ``None``."""
    from lightning_kd.training.lightning_internals import attached_trainer

    return getattr(getattr(attached_trainer(module), "datamodule", None), "tokenizer", None)


def made_with(module: Any, model: nn.Module, teacher: nn.Module | None = None) -> dict[str, Any]:
    """The record a lightning-kd module writes into its checkpoints: its task, the head of ``model`` (the model it
    trains, whose weights the checkpoint holds), the data's tokenizer, and the ``teacher`` it distils from (which
    the checkpoint does not hold: its fingerprint says which one it was)."""
    return {
        "task": getattr(module, "hparams", {}).get("task"),
        "head": type(getattr(model, "_orig_mod", model)).__name__,
        "labels": _labels(model),
        "tokenizer": tokenizer_record(run_tokenizer(module)),
        "teacher": model_record(teacher) if teacher is not None else None,
    }


def _labels(model: nn.Module) -> int | None:
    model = getattr(model, "_orig_mod", model)
    config = getattr(model, "config", None)
    return getattr(config, "num_labels", None) if "Classification" in type(model).__name__ else None
