"""Causal-LM batches: documents joined with the tokenizer's end-of-text token, packed into blocks, not masked.

The choice between the two kinds of block is ``lm``: ``"mlm"`` (``[CLS] ... [SEP]`` blocks, masked at collate
time, for BERT-like models) or ``"causal"`` (for decoder LMs: Llama, Qwen, Mistral). A causal batch is
``input_ids``, ``attention_mask`` and ``labels``, the labels being the input ids themselves with -100 at
padding: Hugging Face causal LMs shift the labels inside the model (the logits at position ``i`` are scored
against ``labels[i + 1]``), so shifting them here as well would teach the model to predict two tokens ahead.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torchmetrics import Metric
from transformers import PreTrainedTokenizerBase

from lightning_kd.batch import IGNORE_INDEX, as_arrays

LM = Literal["mlm", "causal"]
LMS = ("mlm", "causal")
CAUSAL_PACKED_KEY = "_packed_causal"
# Prepared causal blocks are padded with this, not with a token id: decoder tokenizers often have no pad token,
# and any id used in its place (the end of text, or 0) also occurs in the text, where it must not be masked out.
PAD_MARK = -1


def check_lm(lm: str) -> None:
    if lm not in LMS:
        raise ValueError(
            f"lm={lm!r} is not a kind of language model: use lm: mlm (masked LM, BERT-like) or lm: causal "
            "(decoder LMs such as Llama, Qwen, Mistral)"
        )


def end_of_text(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that separates documents in causal blocks, or an error saying how to give the tokenizer one."""
    if tokenizer.eos_token_id is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"the tokenizer {name!r} has no end-of-text (eos) token, which causal-LM blocks put between "
            "documents: use the causal LM's own tokenizer, or give this one an eos token "
            "(tokenizer.add_special_tokens({'eos_token': '<|endoftext|>'}); tokenizer.save_pretrained(folder)) "
            "and pass the folder, resizing the model's embeddings if the token is new"
        )
    return int(tokenizer.eos_token_id)


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that fills padded positions (masked out, so any real id does): the pad token, else end of text."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_text(tokenizer)


def causal_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
    """A causal batch in packed form (one array, pickled by value from a worker: see ``as_arrays``); ``unpack``
    (:mod:`.masking`) turns it into ``input_ids``, ``attention_mask`` and ``labels``."""
    # Not shifted: the model shifts (see the module's docstring).
    labels = torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return as_arrays({CAUSAL_PACKED_KEY: torch.stack([input_ids, attention_mask, labels])})


class CausalCollate:
    """Prepared causal blocks (padded with ``PAD_MARK``) -> a causal batch."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.fill = padding_id(tokenizer)
        self.epoch = 0  # set by the loader as for the masking collate; nothing here depends on it

    def __call__(self, blocks: list[Any]) -> dict[str, Any]:
        input_ids = torch.from_numpy(np.stack([np.asarray(block) for block in blocks]).astype(np.int64))
        attention_mask = (input_ids != PAD_MARK).long()
        return causal_batch(input_ids.masked_fill(attention_mask == 0, self.fill), attention_mask)


class Perplexity(Metric):
    """Next-token perplexity over an evaluation set: exp of the mean negative log-likelihood over every predicted
    token, summed across batches and ranks before the exp (a mean of batch perplexities would weight a short batch
    as a full one).

    The sums are replaced, not added to in place: a standalone ``validate`` makes its states under inference mode,
    and fit's validation, which runs without it, may not change such tensors in place.
    """

    def __init__(self) -> None:
        super().__init__()
        for name in ("nll", "tokens"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nll: torch.Tensor, tokens: torch.Tensor) -> None:  # type: ignore[override]
        """``nll``: the summed negative log-likelihood of ``tokens`` predicted tokens."""
        self.nll = self.nll + nll.detach().double()
        self.tokens = self.tokens + tokens

    def compute(self) -> torch.Tensor:  # type: ignore[override]
        return torch.exp(self.nll / self.tokens.clamp_min(1))
