"""MLM batches: BERT's masking (by token or by whole word), applied at collate time, and the packed form in which
a DataLoader worker hands a batch over (one tensor, one shared-memory segment), MLM or causal (:mod:`.causal`)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from lightning_kd.datamodules.causal import CAUSAL_PACKED_KEY

PACKED_KEY = "_packed"


def unpack(batch: dict[str, Any]) -> dict[str, Any]:
    """The model's batch from a packed one: views of the one tensor a reader sent, plus token types for MLM."""
    if CAUSAL_PACKED_KEY in batch:
        # No token types: decoder LMs have no segment embeddings to read them with.
        input_ids, attention_mask, labels = batch.pop(CAUSAL_PACKED_KEY).unbind(0)
        batch.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        return batch
    if PACKED_KEY not in batch:
        return batch
    packed = batch.pop(PACKED_KEY)
    input_ids, attention_mask, labels = packed.unbind(0)
    batch.update(
        input_ids=input_ids,
        attention_mask=attention_mask,
        token_type_ids=torch.zeros_like(input_ids),
        labels=labels,
    )
    return batch


def continuation_table(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """``table[id]`` is True when token ``id`` continues a word (``##ing``; no ``Ġ``/``▁`` prefix)."""
    vocab = tokenizer.get_vocab()
    table = torch.zeros(max(len(tokenizer), max(vocab.values()) + 1), dtype=torch.bool)
    tokens = list(vocab)
    if any(token.startswith("##") for token in tokens):
        continues = [token.startswith("##") for token in tokens]
    else:
        marker = (
            "Ġ" if sum(t.startswith("Ġ") for t in tokens) > sum(t.startswith("▁") for t in tokens) else "▁"
        )
        continues = [not token.startswith(marker) and token.isalnum() for token in tokens]
    table[torch.tensor(list(vocab.values()))] = torch.tensor(continues)
    table[torch.tensor(tokenizer.all_special_ids, dtype=torch.long)] = False
    return table


def mask_tokens(
    input_ids: torch.Tensor,
    special: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    probability: float,
    generator: torch.Generator,
    continuation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's MLM masking: choose ``probability`` of the tokens (or of the words), then 80% [MASK], 10% random, 10% kept."""
    shape = input_ids.shape
    if continuation is not None:
        # A word is a start token and its continuations; one draw per word masks all its pieces together.
        starts = ~continuation[input_ids] | special
        word = torch.cumsum(starts.long(), dim=1) - 1
        draws = torch.rand(shape, generator=generator)
        chosen = torch.gather(draws, 1, word) < probability
    else:
        chosen = torch.rand(shape, generator=generator) < probability
    chosen &= ~special
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    action = torch.rand(shape, generator=generator)
    masked = input_ids.clone()
    masked[chosen & (action < 0.8)] = mask_token_id
    swap = chosen & (action >= 0.8) & (action < 0.9)
    masked[swap] = torch.randint(vocab_size, shape, generator=generator, dtype=input_ids.dtype)[swap]
    return masked, labels
