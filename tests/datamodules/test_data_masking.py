"""MLM masking over a whole batch: BERT's 80/10/10 over 15%, special tokens and padding never masked, whole words
masked together, a fixed seed giving a fixed result."""

from __future__ import annotations

import pytest
import torch
from kd_datafiles import WORDS

from lightning_kd.batch import prediction_positions
from lightning_kd.datamodules.masking import MLMMasking, continuation_table, mask_tokens


@pytest.fixture(scope="module")
def text_batch(tokenizer) -> torch.Tensor:
    """128 rows of 64 tokens of text: [CLS] pieces [SEP] pieces ... [SEP] [PAD] [PAD], many words in pieces."""
    ids = tokenizer(" ".join(WORDS * 400), add_special_tokens=False)["input_ids"]
    rows = []
    for k in range(128):
        body = ids[k * 59 : (k + 1) * 59]
        rows.append([tokenizer.cls_token_id, *body[:30], tokenizer.sep_token_id, *body[30:], 102, 0, 0])
    return torch.tensor(rows)


def words(ids: torch.Tensor, tokenizer) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each word of ordinary pieces: a piece and the ``##`` pieces after it."""
    table = continuation_table(tokenizer)
    special = set(tokenizer.all_special_ids)
    spans = []
    for row in ids.tolist():
        row_spans: list[tuple[int, int]] = []
        for col, token in enumerate(row):
            if token in special:
                continue
            if table[token] and row_spans and row_spans[-1][1] == col:
                row_spans[-1] = (row_spans[-1][0], col + 1)
            else:
                row_spans.append((col, col + 1))
        spans.append(row_spans)
    return spans


def check_80_10_10(ids: torch.Tensor, masked: torch.Tensor, labels: torch.Tensor, mask_id: int) -> None:
    chosen = labels != -100
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen]), "a token not chosen was changed"
    as_mask = (masked[chosen] == mask_id).float().mean().item()
    kept = (masked[chosen] == ids[chosen]).float().mean().item()
    assert abs(as_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.025, (as_mask, kept)
    replaced = masked[chosen & (masked != mask_id) & (masked != ids)]
    assert abs(len(replaced) / chosen.sum().item() - 0.1) < 0.025
    assert len(set(replaced.tolist())) > 0.9 * len(replaced), (
        "random tokens should spread over the vocabulary"
    )


def test_token_masking_statistics(tokenizer):
    masking = MLMMasking(tokenizer, 0.15, whole_word_masking=False)
    ids = torch.randint(1000, 30000, (256, 128), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, 64], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.sep_token_id
    ids[:5, 70] = tokenizer.unk_token_id
    padding = torch.zeros_like(ids, dtype=torch.bool)
    padding[:, 100:] = True  # ordinary ids where the attention mask says padding: never masked either
    masked, labels, positions = masking(ids, torch.Generator().manual_seed(1), padding)
    chosen = labels != -100
    assert not chosen[:, [0, 64, 127]].any() and not chosen[:5, 70].any() and not chosen[padding].any()
    maskable = ~padding
    maskable[:, [0, 64]] = False
    maskable[:5, 70] = False
    assert abs(chosen[maskable].float().mean().item() - 0.15) < 0.01
    check_80_10_10(ids, masked, labels, tokenizer.mask_token_id)
    assert torch.equal(positions, prediction_positions(labels))


def test_whole_word_masking_statistics_and_grouping(tokenizer, text_batch):
    masking = MLMMasking(tokenizer, 0.15, whole_word_masking=True)
    masked, labels, positions = masking(text_batch, torch.Generator().manual_seed(2))
    chosen = labels != -100
    spans = words(text_batch, tokenizer)
    assert sum(end - start > 1 for row in spans for start, end in row) > 500, "few words in pieces: no test"
    chosen_words = 0
    for row, row_spans in enumerate(spans):
        for start, end in row_spans:
            pieces = chosen[row, start:end]
            assert pieces.all() or not pieces.any(), f"row {row}: a word was partly masked"
            chosen_words += bool(pieces[0])
    assert abs(chosen_words / sum(map(len, spans)) - 0.15) < 0.015
    special = torch.isin(text_batch, torch.tensor(tokenizer.all_special_ids))
    assert not chosen[special].any()
    check_80_10_10(text_batch, masked, labels, tokenizer.mask_token_id)
    assert torch.equal(positions, prediction_positions(labels))


def test_a_block_that_starts_inside_a_word_masks_that_fragment_together(tokenizer):
    pieces = tokenizer("hyperparameterization", add_special_tokens=False)["input_ids"]
    assert len(pieces) >= 3
    ids = torch.tensor([pieces[1:] + pieces] * 400)  # starts with "##" pieces, whose word start is not here
    cut = len(pieces) - 1
    masking = MLMMasking(tokenizer, 0.5, whole_word_masking=True)
    _, labels, _ = masking(ids, torch.Generator().manual_seed(3))
    chosen = labels != -100
    for start, end in ((0, cut), (cut, ids.shape[1])):
        assert torch.equal(chosen[:, start:end].all(1), chosen[:, start:end].any(1))
    # The fragment and the whole word decide apart: both states of one with the other occur.
    assert (chosen[:, 0] != chosen[:, cut]).any()


@pytest.mark.parametrize("whole_word", [False, True])
def test_a_fixed_seed_gives_a_fixed_result(tokenizer, text_batch, whole_word):
    masking = MLMMasking(tokenizer, 0.15, whole_word)
    first = masking(text_batch, torch.Generator().manual_seed(7))
    again = MLMMasking(tokenizer, 0.15, whole_word)(text_batch, torch.Generator().manual_seed(7))
    other = masking(text_batch, torch.Generator().manual_seed(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[1], other[1])


def test_mask_tokens_keeps_its_contract(tokenizer, text_batch):
    # The function form, with the caller's own special mask and continuation table, masks as MLMMasking does.
    special = torch.isin(text_batch, torch.tensor(tokenizer.all_special_ids))
    for whole_word in (False, True):
        table = continuation_table(tokenizer) if whole_word else None
        masked, labels = mask_tokens(
            text_batch,
            special,
            tokenizer.mask_token_id,
            len(tokenizer),
            0.15,
            torch.Generator().manual_seed(4),
            table,
        )
        expected = MLMMasking(tokenizer, 0.15, whole_word)(text_batch, torch.Generator().manual_seed(4))
        assert torch.equal(masked, expected[0]) and torch.equal(labels, expected[1])
