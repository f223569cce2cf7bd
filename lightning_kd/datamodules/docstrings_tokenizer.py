"""An offline tokenizer for decoder LMs: a byte-level BPE learned from the training split of the docstrings corpus,
with an end-of-text token, so causal-LM recipes run on a machine that cannot reach the hub.

The only tokenizer packaged offline is MiniLM's WordPiece, which has no end-of-text token for causal blocks to put
between documents. This one is learned once per corpus and kept under the cache dir. A recipe names it
``lightning-kd/docstrings-bpe`` as it would name a hub tokenizer: :func:`lightning_kd.hub.resolve_pretrained`
turns the name into the cached folder, building it on first use.

Learning it is deterministic: the same corpus gives the same merges in any process (ByteLevel BPE sorts its
alphabet, and merges with equal counts are ordered by their token ids). The folder's name carries a hash of the
corpus, the vocabulary size and the ``tokenizers`` version, so another corpus or library gets another folder,
never a stale one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from lightning_kd.datamodules.docstrings import default_cache_dir, docstrings_path, read_docstrings

DOCSTRINGS_TOKENIZER = "lightning-kd/docstrings-bpe"
END_OF_TEXT = "<|endoftext|>"
# 256 bytes, the end-of-text token and 767 merges: about 2.6 characters per token on the docstrings, and an
# embedding table a demo-sized model can afford
VOCAB_SIZE = 1024
_FORMAT = 1  # bumped when the way the tokenizer is built changes, so cached folders are rebuilt


def docstrings_tokenizer_folder(
    vocab_size: int = VOCAB_SIZE, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The folder of the docstrings BPE tokenizer (``tokenizer.json`` and its config), learned on first use.

    Loads with ``AutoTokenizer.from_pretrained(folder)``. Its one special token, ``<|endoftext|>`` (id 0), is the
    eos, bos and pad token, as in Qwen2's tokenizers: padded positions are masked out, so pad needs no id of its
    own. Several processes may build it at once: each writes a folder of its own and renames it into place.
    """
    import tokenizers

    corpus = docstrings_path(["stdlib"], cache_dir, split="train")
    digest = hashlib.sha1()
    digest.update(corpus.read_bytes())
    digest.update(f"{vocab_size} {tokenizers.__version__} {_FORMAT}".encode())
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / f"docstrings-bpe-{vocab_size}-{digest.hexdigest()[:12]}"
    if (folder / "tokenizer.json").is_file():
        return folder
    staging = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    build_tokenizer([record["text"] for record in read_docstrings(corpus)], vocab_size).save_pretrained(
        staging
    )
    try:
        os.rename(staging, folder)
    except OSError:
        # another process renamed its identical folder into place first
        if not (folder / "tokenizer.json").is_file():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def build_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerBase:
    """A fast byte-level BPE tokenizer learned from ``texts``, with ``<|endoftext|>`` as eos, bos and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257 + 1:
        raise ValueError(
            f"vocab_size={vocab_size} leaves no room for merges: a byte-level BPE needs the 256 bytes and the "
            f"end-of-text token first; use at least 258 (the default is {VOCAB_SIZE})"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=END_OF_TEXT,
        bos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        # decoding gives back the text exactly, spaces before punctuation included
        clean_up_tokenization_spaces=False,
    )
