"""The data's tokenizer must be the model's own: another vocabulary is refused before training, naming both."""

from __future__ import annotations

from pathlib import Path

import pytest
from kd_datafiles import TOKENIZER
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from lightning_kd.datamodules.common import check_vocabulary
from lightning_kd.hub import load_tokenizer


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


class Holder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def saved_model(
    folder: Path, tokenizer: PreTrainedTokenizerFast | None, vocab_size: int = 64, pad: int = 0
) -> BertModel:
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        pad_token_id=pad,
    )
    BertModel(config).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return BertModel.from_pretrained(folder)


def test_another_tokenizer_than_the_models_own_is_refused_naming_both(tmp_path: Path) -> None:
    own = word_tokenizer(["cat", "dog", "fish"])
    model = saved_model(tmp_path / "model", own)
    check_vocabulary(load_tokenizer(tmp_path / "model"), Holder(model))  # its own: accepted
    other = word_tokenizer(["dog", "cat", "fish"])  # same size and specials, other ids
    with pytest.raises(
        ValueError, match=f"not the model's own \\('{tmp_path / 'model'}'.*another token -> id"
    ):
        check_vocabulary(other, Holder(model))


def test_padding_id_of_another_vocabulary_is_refused(tmp_path: Path) -> None:
    model = saved_model(tmp_path / "model", None, pad=1)  # RoBERTa pads with 1, BERT with 0
    with pytest.raises(ValueError, match="pads with id 0, but the model was trained with padding id 1"):
        check_vocabulary(word_tokenizer(["cat"]), Holder(model))


def test_a_tokenizer_far_smaller_than_the_table_is_refused_when_the_models_own_is_unknown(
    tmp_path: Path,
) -> None:
    bert = load_tokenizer(TOKENIZER)  # 30522 tokens
    deberta_sized = saved_model(tmp_path / "large", None, vocab_size=128100)
    with pytest.raises(ValueError, match="has 30522 tokens but the model's embedding table has 128100 rows"):
        check_vocabulary(bert, Holder(deberta_sized))
    rounded = saved_model(tmp_path / "rounded", None, vocab_size=30528)  # rounded up to a multiple of 64
    check_vocabulary(bert, Holder(rounded))
