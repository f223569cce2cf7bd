"""MLM batches: BERT's masking (by token or by whole word), applied at collate time, and the packed form in which
a DataLoader worker hands a batch over (one array, pickled by value), MLM or causal (:mod:`.causal`)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from lightning_kd.batch import as_tensors
from lightning_kd.datamodules.causal import CAUSAL_PACKED_KEY

PACKED_KEY = "_packed"


def unpack(batch: dict[str, Any], pin_memory: bool = False) -> dict[str, Any]:
    """The model's batch from a packed one: views of the one tensor a reader sent, plus token types for MLM.

    A reader sends arrays (:func:`~lightning_kd.batch.as_arrays`); they become tensors here, page-locked when the
    loader was asked to pin memory.
    """
    batch = as_tensors(batch, pin_memory)
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


# Kinds of token id in MLMMasking's table: a word's first piece, a piece continuing a word, a special token.
_STARTS, _CONTINUES, _SPECIAL = 0, 1, 2


class MLMMasking:
    """BERT's MLM masking of a whole batch at once, for one tokenizer (see :func:`mask_tokens`).

    One lookup in a table built once (special token, or piece continuing a word, per token id) replaces the
    search of every token among the special ids and the separate continuation lookup.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, probability: float, whole_word_masking: bool
    ) -> None:
        if tokenizer.mask_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no mask token, so it cannot make MLM batches")
        if whole_word_masking:
            continuation = continuation_table(tokenizer)
            table = torch.full((len(continuation),), _STARTS, dtype=torch.uint8)
            table[continuation] = _CONTINUES
        else:
            size = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
            table = torch.full((size,), _STARTS, dtype=torch.uint8)
        table[torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)] = _SPECIAL
        self.table = table
        self.whole_word_masking = whole_word_masking
        self.mask_token_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.probability = probability

    def __call__(
        self, input_ids: torch.Tensor, generator: torch.Generator, padding: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(masked input ids, labels: the original ids where masked and -100 elsewhere, the masked positions as
        flat indices: ``prediction_positions``); ``padding``: True where a position is padding, never masked
        whatever its id."""
        kinds = self.table.index_select(0, input_ids.reshape(-1)).view(input_ids.shape)
        special = kinds == _SPECIAL
        if padding is not None:
            special |= padding
        starts = kinds != _CONTINUES if self.whole_word_masking else None
        return _mask(
            input_ids, special, starts, self.mask_token_id, self.vocab_size, self.probability, generator
        )


def mask_tokens(
    input_ids: torch.Tensor,
    special: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    probability: float,
    generator: torch.Generator,
    continuation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's MLM masking: choose ``probability`` of the tokens (or of the words), then 80% [MASK], 10% random, 10% kept.

    ``special``: True where a token must not be masked (special tokens, padding). ``continuation``: the table of
    :func:`continuation_table`, for whole-word masking: a word's pieces are chosen together.
    """
    starts = None if continuation is None else ~continuation[input_ids] | special
    masked, labels, _ = _mask(input_ids, special, starts, mask_token_id, vocab_size, probability, generator)
    return masked, labels


def _mask(
    input_ids: torch.Tensor,
    special: torch.Tensor,
    starts: torch.Tensor | None,
    mask_token_id: int,
    vocab_size: int,
    probability: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Each torch call costs microseconds whatever its size, so few calls over the whole batch, then the
    # 80/10/10 decision on the chosen positions alone (15% of the batch).
    rows, length = input_ids.shape
    if starts is None:
        draws = torch.rand((rows, length), generator=generator)
    else:
        # One draw per word, shared by its pieces through the word index; column 0 is for the piece of a word
        # that the block's start cut off, which has no start of its own.
        word_draws = torch.rand((rows, length + 1), generator=generator)
        draws = torch.gather(word_draws, 1, torch.cumsum(starts, dim=1))
    positions = (draws.masked_fill_(special, 1.0) < probability).view(-1).nonzero().squeeze(1)
    flat = input_ids.reshape(-1)
    originals = flat.index_select(0, positions)
    # Each chosen piece decides alone, as BERT's does (a whole word's pieces too).
    action = torch.rand(positions.shape, generator=generator)
    random_ids = torch.randint(vocab_size, positions.shape, generator=generator, dtype=input_ids.dtype)
    replaced = torch.where(action < 0.8, mask_token_id, torch.where(action < 0.9, random_ids, originals))
    masked = flat.clone().index_copy_(0, positions, replaced).view(rows, length)
    labels = torch.full_like(flat, -100).index_copy_(0, positions, originals).view(rows, length)
    return masked, labels, positions
