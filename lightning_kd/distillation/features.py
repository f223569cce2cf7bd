"""What one model gives the objective for a batch: logits (only at the positions a loss reads; a QA head's start
and end logits stacked), hidden states, attention maps and captured queries, keys and values, asked of the
model through its adapter."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from lightning_kd.batch import PREDICTION_POSITIONS, complete_batch, prediction_positions
from lightning_kd.models.adapter import MaskedLMParts
from lightning_kd.models.capture import capture_qkv
from lightning_kd.models.info import has_adapter, masked_lm_parts
from lightning_kd.models.registry import get_adapter
from lightning_kd.objective.term import Features, Needs

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def prepare_batch(batch: Mapping[str, Tensor], needs: Needs) -> Mapping[str, Tensor]:
    """The batch with an attention mask, and with the positions MLM losses read when ``needs`` asks for
    logits and the batch lacks them.

    A collate function that adds ``prediction_positions`` (see
    :func:`lightning_kd.datamodules.with_prediction_positions`) computes them on the host for free; computed
    here, from labels on a GPU, they cost one wait for the device per step.
    """
    batch = complete_batch(batch)
    labels = batch.get("labels")
    if (
        PREDICTION_POSITIONS in batch
        or not (needs.logits or needs.head_inputs)
        or labels is None
        or labels.shape != batch["input_ids"].shape
    ):
        return batch
    return {**batch, PREDICTION_POSITIONS: prediction_positions(labels)}


def model_features(
    model: nn.Module, batch: Mapping[str, Tensor], needs: Needs, qkv_layers: frozenset[int]
) -> Features:
    """``model``'s outputs on ``batch`` that ``needs`` asks for, with q/k/v captured at ``qkv_layers``
    (1-based). The caller picks the grad mode: the teacher runs under ``no_grad``, the student does not."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if has_adapter(model):
        inputs["attention_mask"] = get_adapter(model).attention_mask_input(model, inputs["attention_mask"])
    capture = capture_qkv(model, [i - 1 for i in sorted(qkv_layers)]) if qkv_layers else nullcontext({})
    parts = masked_lm_parts(model)
    positions = batch.get(PREDICTION_POSITIONS) if needs.logits or needs.head_inputs else None
    logits = head_input = head = None
    with capture as qkv:
        # A masked LM runs its encoder, then its prediction head only at the positions a loss reads.
        out = (parts.encoder if parts is not None else model)(
            **inputs,
            output_hidden_states=needs.hidden_states,
            output_attentions=needs.attentions,
            return_dict=True,
        )
    if parts is not None and (needs.logits or needs.head_inputs):
        hidden = out.last_hidden_state
        if positions is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        if needs.logits:
            logits = parts.predict(hidden)
        if needs.head_inputs:
            head_input, head = hidden, _head_in_its_precision(parts)
    elif needs.logits and getattr(out, "start_logits", None) is not None:
        return Features(
            logits=torch.stack([out.start_logits, out.end_logits], dim=1),
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            qkv={i + 1: v for i, v in qkv.items()},
            spans=True,
        )
    elif needs.logits:
        logits = getattr(out, "logits", None)
        if positions is not None and logits is not None and logits.dim() == 3:
            # a model whose head lightning-kd cannot split: gathered after the fact, so both sides match
            logits = logits.reshape(-1, logits.shape[-1]).index_select(0, positions)
        elif logits is None or logits.dim() != 3:
            positions = None
    return Features(
        logits=logits,
        hidden_states=out.hidden_states,
        attentions=out.attentions,
        qkv={i + 1: v for i, v in qkv.items()},
        positions=positions,
        head_input=head_input,
        head=head,
    )


def _head_in_its_precision(parts: MaskedLMParts) -> Callable[[Tensor], Tensor]:
    """``parts.predict`` for rows of any precision: the losses call it with autocast off, where a float32 row
    meets a bf16 teacher's head (or a bf16 row a float32 head) and the matrix product would refuse them."""
    dtype = next(parts.head.parameters()).dtype
    return lambda rows: parts.predict(rows.to(dtype))
