"""Teacher-output caching for task-specific distillation: the frozen teacher's outputs on a fixed task set are
computed once per training example and reused in every later epoch.

An example is recognised by its tokens (a hash of its unpadded ``input_ids`` and ``token_type_ids``), so a cache
can never serve one example's outputs for another: changing the data or the tokenizer changes the keys. The
teacher is recognised by its fingerprint (:func:`lightning_kd.training.provenance.model_fingerprint`: every tensor's name,
shape and dtype and a sample of its values); a cache on disk lives in a file named by it, which also holds the
teacher's record, so another teacher never reads it (a file copied in under another name is refused). Only an eval-mode (dropout-free) teacher can be cached: its outputs are a
function of the tokens alone.

Cached: the logits (``[num_labels]`` per example; a QA teacher's start and end scores, ``[2, length]`` per
window) and, only if asked, the hidden states (``[layers + 1, length,
hidden]`` per example, which is far larger: the size is estimated and printed before the first epoch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_kd.files import atomic_write, faults_named
from lightning_kd.models.layers import is_classifier, is_question_answering
from lightning_kd.objective.term import Features
from lightning_kd.training.provenance import check_made_with, model_fingerprint, model_record


def teacher_fingerprint(teacher: nn.Module) -> str:
    """The teacher's fingerprint (:func:`lightning_kd.training.provenance.model_fingerprint`): a cache made with another
    teacher, or the same one in another dtype, is never read."""
    return model_fingerprint(teacher)


class TeacherCache:
    """Per-example teacher outputs, in memory (``store="memory"``) or also on disk (``store=<folder>``: loaded at
    the start of fit, saved at the end of every epoch, in ``<folder>/teacher-<fingerprint>.pt``).

    Args:
        store: ``"memory"`` or a folder.
        hidden_states: cache the hidden states as well (for terms that read them, at a much larger size).
    """

    def __init__(self, store: str = "memory", hidden_states: bool = False) -> None:
        self.store = store
        self.hidden_states = hidden_states
        self.entries: dict[bytes, dict[str, Any]] = {}
        self.fingerprint = ""
        self.made_with: dict[str, Any] | None = None  # the teacher's record, saved with the entries
        self.hits = self.misses = 0
        self.rank = 0  # under DDP each rank keeps (and saves) the examples it is given
        self._dirty = False

    # ------------------------------------------------------------------------------------------ set-up

    @classmethod
    def from_spec(cls, spec: str | Mapping[str, Any] | None) -> TeacherCache | None:
        if spec is None or spec is False:
            return None
        if isinstance(spec, str):
            return cls(spec)
        unknown = set(spec) - {"store", "hidden_states"}
        if unknown:
            raise ValueError(
                f"unknown teacher_cache options {sorted(unknown)}: use store ('memory' or a folder) "
                "and hidden_states (true or false)"
            )
        return cls(**spec)

    @property
    def path(self) -> Path | None:
        if self.store == "memory":
            return None
        return Path(self.store) / f"teacher-{self.fingerprint}{f'-rank{self.rank}' if self.rank else ''}.pt"

    def start(self, module: Any) -> None:
        """Bind to a DistillationModule's teacher and objective when training starts, and say what the cache will
        hold for the run's training data (its examples and mean length, when the DataModule lists them)."""
        self.rank = module.global_rank
        self.bind(module.teacher, module.objective.needs())
        rows = getattr(getattr(module.trainer, "datamodule", None), "datasets", {}).get("train")
        if rows:
            examples, mean = len(rows), sum(len(r["input_ids"]) for r in rows) / len(rows)
        else:
            examples, mean = int(module.trainer.num_training_batches), 0.0
        self.announce(examples, mean, module.teacher)

    def bind(self, teacher: nn.Module, needs: Any) -> None:
        """Check that caching is sound for this teacher and objective, and load a saved cache of this teacher."""
        if teacher.training:
            raise ValueError(
                "teacher_cache needs a dropout-free teacher (eval mode): a teacher in train mode gives "
                "different outputs each epoch, which a cache would freeze"
            )
        if not (is_classifier(teacher) or is_question_answering(teacher)):
            raise ValueError(
                "teacher_cache is for task-specific distillation (a sequence-classification or "
                "question-answering teacher): "
                "per-position outputs of a masked-LM teacher are too large to keep"
            )
        reads = [
            name
            for name, asked in (("attentions", needs.attentions), ("q/k/v", bool(needs.teacher_qkv_layers)))
            if asked
        ]
        if needs.hidden_states and not self.hidden_states:
            reads.insert(0, "hidden states")
        if reads:
            hint = (
                " pass teacher_cache={'store': ..., 'hidden_states': true},"
                if reads == ["hidden states"]
                else ""
            )
            raise ValueError(
                f"the objective reads the teacher's {', '.join(reads)}, which the cache does not keep:"
                f"{hint} or distil without teacher_cache"
            )
        self.made_with = model_record(teacher)
        if self.made_with["fingerprint"] != self.fingerprint:
            self.entries, self.fingerprint = {}, self.made_with["fingerprint"]
        if self.path is not None and self.path.is_file() and not self.entries:
            saved = torch.load(self.path, weights_only=True)
            if "entries" in saved:  # files from before the record hold the entries alone
                fix = f"Delete {self.path}: it is computed again in the next epoch."
                check_made_with(saved.get("made_with"), teacher, "the teacher cache", self.path, fix)
                saved = saved["entries"]
            self.entries = saved
            rank_zero_info(f"teacher cache: {len(self.entries)} examples loaded from {self.path}")

    def estimate_bytes(self, examples: int, mean_length: float, teacher: nn.Module) -> int:
        config = teacher.config
        per_example = 2 * mean_length if is_question_answering(teacher) else config.num_labels
        if self.hidden_states:
            per_example += (config.num_hidden_layers + 1) * mean_length * config.hidden_size
        return int(examples * per_example * 4)

    def announce(self, examples: int, mean_length: float, teacher: nn.Module) -> None:
        """Print how large the cache will be, before the first epoch fills it."""
        size = self.estimate_bytes(examples, mean_length, teacher)
        what = "logits and hidden states" if self.hidden_states else "logits"
        where = "in memory" if self.path is None else f"in memory and in {self.path}"
        rank_zero_info(
            f"teacher cache: {what} of {examples} examples, about {size / 2**20:.1f} MiB, kept {where}"
        )

    # ------------------------------------------------------------------------------------------ use

    @staticmethod
    def keys(batch: Mapping[str, Tensor]) -> list[bytes]:
        ids = batch["input_ids"].detach().cpu()
        lengths = (
            batch["attention_mask"].sum(1).tolist()
            if "attention_mask" in batch
            else [ids.shape[1]] * len(ids)
        )
        types = batch.get("token_type_ids")
        types = types.detach().cpu() if types is not None else None
        keys = []
        for row, n in enumerate(lengths):
            digest = hashlib.blake2b(ids[row, :n].numpy().tobytes(), digest_size=16)
            if types is not None:
                digest.update(types[row, :n].numpy().tobytes())
            keys.append(digest.digest())
        return keys

    def features(self, batch: Mapping[str, Tensor], compute: Callable[[], Features]) -> Features:
        """The teacher's features for ``batch``: from the cache when every row is in it, else computed (and the
        rows stored)."""
        keys = self.keys(batch)
        found = [self.entries.get(key) for key in keys]
        if all(entry is not None for entry in found):
            self.hits += len(keys)
            return self._assemble(found, batch)
        self.misses += len(keys)
        features = compute()
        lengths = batch["attention_mask"].sum(1).tolist()
        for row, key in enumerate(keys):
            logits = features.logits[row]
            if features.spans:  # a window's start and end scores: kept without the batch's padding
                logits = logits[:, : lengths[row]]
            entry: dict[str, Any] = {"logits": logits.detach().float().cpu().clone()}
            if self.hidden_states:
                entry["hidden"] = (
                    torch.stack([h[row, : lengths[row]] for h in features.hidden_states]).float().cpu()
                )
            self.entries[key] = entry
        self._dirty = True
        return features

    def _assemble(self, entries: list[dict[str, Any]], batch: Mapping[str, Tensor]) -> Features:
        device = batch["input_ids"].device
        spans = entries[0]["logits"].dim() == 2
        if spans:  # padded to this batch's width; the losses score padding out (see objective.predictions)
            width = batch["input_ids"].shape[1]
            logits = torch.zeros(len(entries), 2, width)
            for row, entry in enumerate(entries):
                logits[row, :, : entry["logits"].shape[1]] = entry["logits"]
            logits = logits.to(device)
        else:
            logits = torch.stack([e["logits"] for e in entries]).to(device)
        hidden = None
        if self.hidden_states:
            width = batch["input_ids"].shape[1]
            first = entries[0]["hidden"]
            padded = first.new_zeros(len(entries), first.shape[0], width, first.shape[2])
            for row, entry in enumerate(entries):
                padded[row, :, : entry["hidden"].shape[1]] = entry["hidden"]
            hidden = tuple(padded.to(device).unbind(1))
        return Features(logits=logits, hidden_states=hidden, spans=spans)

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        with faults_named(self.path, "teacher cache"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.path, what="teacher cache") as handle:
            torch.save({"made_with": self.made_with, "entries": self.entries}, handle)
        self._dirty = False

    def hit_rate(self) -> float:
        total = self.hits + self.misses
        rate = self.hits / total if total else 0.0
        self.hits = self.misses = 0
        return rate
