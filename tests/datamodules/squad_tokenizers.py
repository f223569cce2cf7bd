"""Small fast tokenizers of three more families, trained offline in a second on a short text with `tokenizers`.

RoBERTa-style byte-level BPE: a leading space is part of a word's token, offsets are trimmed to the word, a
non-ASCII character can be split over several byte tokens with the same offsets, no ``token_type_ids``.
DeBERTa-v2-style SentencePiece (Unigram + Metaspace): runs of whitespace are collapsed before tokenising, a
word's ``▁`` token's offsets start at the space before it, ``token_type_ids`` as BERT has them.
Decoder-LM-style (GPT-2, Llama) byte-level BPE: one end-of-text token and no pad, mask, [CLS] or [SEP] token.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    DebertaV2TokenizerFast,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    RobertaTokenizerFast,
)

TEXT = """\
The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France.
They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who swore fealty to King
Charles III of West Francia. The café in Zürich served crème brûlée to naïve tourists in 1995 and again in 2004.
Seven wizards quietly box jovial zebras near rivers and mountains; the quick brown fox jumps over a lazy dog.
What, when, where, who and why: questions about the history of computation, algorithms and complexity theory.
Tesla was born on 10 July 1856 in the village of Smiljan, within the Military Frontier of the Austrian Empire.
How many? Which year? In what country is Normandy located? Who was the duke in the battle of Hastings?
"""

ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
DEBERTA_SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]


def _lines(texts: Iterable[str] | None) -> list[str]:
    lines = [line for line in TEXT.splitlines() if line.strip()]
    return lines + [t for t in texts or [] if t.strip()]


def roberta_style_tokenizer(
    texts: Iterable[str] | None = None, vocab_size: int = 400
) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer laid out as RoBERTa's: ``<s> question </s></s> context </s>``."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=ROBERTA_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_lines(texts) * 3, trainer)
    backend.post_processor = processors.RobertaProcessing(
        ("</s>", backend.token_to_id("</s>")), ("<s>", backend.token_to_id("<s>")), trim_offsets=True
    )
    return RobertaTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )


def deberta_style_tokenizer(
    texts: Iterable[str] | None = None, vocab_size: int = 300
) -> PreTrainedTokenizerBase:
    """A Unigram tokenizer with DeBERTa-v2's normaliser, Metaspace and ``[CLS] q [SEP] c [SEP]`` template."""
    backend = Tokenizer(models.Unigram())
    backend.normalizer = normalizers.Sequence(
        [
            normalizers.Replace(Regex(r"\s{2,}|[\n\r\t]"), " "),
            normalizers.NFC(),
            normalizers.Strip(left=False, right=True),
        ]
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=DEBERTA_SPECIALS, unk_token="[UNK]", show_progress=False
    )
    backend.train_from_iterator(_lines(texts) * 3, trainer)
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return DebertaV2TokenizerFast(
        tokenizer_object=backend,
        bos_token="[CLS]",
        eos_token="[SEP]",
        sep_token="[SEP]",
        cls_token="[CLS]",
        unk_token="[UNK]",
        pad_token="[PAD]",
        mask_token="[MASK]",
    )


END_OF_TEXT = "<|endoftext|>"


def decoder_style_tokenizer(
    texts: Iterable[str] | None = None, vocab_size: int = 400
) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer as decoder LMs have them: ``<|endoftext|>`` is its only special token (eos),
    and it has no pad token, so a padded position must be told apart from a real token 0 by other means."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_lines(texts) * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT)
