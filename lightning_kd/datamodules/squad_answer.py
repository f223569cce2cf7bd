"""Answering questions about a text with an extractive QA model, as SQuAD scores it.

transformers 5 removed its ``question-answering`` pipeline, so a model fine-tuned or distilled here would have
no ready way to answer a question. `answer_questions` is that way: the same windows the SQuADDataModule makes
and the same post-processing its metrics score, so an answer here is the answer ``predict`` writes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_kd.datamodules.common import get_tokenizer
from lightning_kd.datamodules.squad import encode_windows
from lightning_kd.datamodules.squad_files import SquadExample
from lightning_kd.datamodules.squad_postprocess import SquadAnswers, postprocess
from lightning_kd.finetuning.module import sequence_logits
from lightning_kd.hub import load_model


@torch.no_grad()
def answer_questions(
    model: str | nn.Module,
    questions: Sequence[str],
    contexts: Sequence[str],
    tokenizer: str | PreTrainedTokenizerBase | None = None,
    *,
    version_2: bool = False,
    max_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
    n_best: int = 20,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
    batch_size: int = 32,
) -> SquadAnswers:
    """The answer to each question about its context (keyed ``"0"``, ``"1"``... by position), and for
    ``version_2`` each one's null odds: ``""`` means the model found no answer.

    ``model``: a question-answering model or the folder of one (an export of this library, whose tokenizer is
    saved beside it); ``tokenizer``: by default the model's folder. The window and answer settings are
    :class:`~lightning_kd.SQuADDataModule`'s; use the ones the model was trained with.
    """
    if len(questions) != len(contexts):
        raise ValueError(
            f"{len(questions)} questions but {len(contexts)} contexts: give one context per question"
        )
    if isinstance(model, nn.Module):
        source = getattr(getattr(model, "config", None), "_name_or_path", "")
    else:
        from transformers import AutoModelForQuestionAnswering

        source, model = model, load_model(model, AutoModelForQuestionAnswering)
    if tokenizer is None and not source:
        raise ValueError("the model was not loaded from a folder: pass its tokenizer")
    tokenizer = get_tokenizer(tokenizer if tokenizer is not None else source)
    examples = [
        SquadExample(id=str(i), context=context, question=question)
        for i, (question, context) in enumerate(zip(questions, contexts, strict=True))
    ]
    rows, window_question, offsets = encode_windows(
        tokenizer, examples, max_length, doc_stride, max_query_length
    )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    start, end = torch.full((2, len(rows), max_length), float("-inf"))
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in rows[0]]
    try:
        for first in range(0, len(rows), batch_size):
            chunk = rows[first : first + batch_size]
            padded = tokenizer.pad([{k: row[k] for k in keys} for row in chunk], return_tensors="pt")
            logits = sequence_logits(model, {k: v.to(device) for k, v in padded.items()}).float().cpu()
            start[first : first + len(chunk), : logits.shape[2]] = logits[:, 0]
            end[first : first + len(chunk), : logits.shape[2]] = logits[:, 1]
    finally:
        model.train(was_training)
    table = torch.full((len(rows), max_length, 2), -1, dtype=torch.long)
    for window, spans in enumerate(offsets):
        table[window, : len(spans)] = torch.tensor(spans, dtype=torch.long).view(len(spans), 2)
    return postprocess(
        start,
        end,
        table,
        window_question,
        [e.context for e in examples],
        [e.id for e in examples],
        n_best=n_best,
        max_answer_length=max_answer_length,
        version_2=version_2,
        null_score_diff_threshold=null_score_diff_threshold,
    )
