"""Causal-LM data (lm="causal"): prepared blocks and streamed blocks of documents joined by end of text, batches a
Hugging Face causal LM takes as they are, resuming, and the refusals (no eos; a folder prepared for the other lm)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kd_datafiles import TOKENIZER, document, write_lines
from squad_tokenizers import decoder_style_tokenizer, roberta_style_tokenizer

from lightning_kd.cli import main as cli_main
from lightning_kd.datamodules import PretrainingDataModule
from lightning_kd.datamodules.prepare import PreparedDataError, prepare, read_manifest

FILES, PER_FILE = 3, 40


def write_corpus(folder: Path) -> list[str]:
    texts = []
    for k in range(FILES):
        texts += write_lines(folder / f"part-{k}.txt", PER_FILE, first=k * PER_FILE)
    return texts


@pytest.fixture(scope="module", params=["decoder", "roberta"])
def causal(request, tmp_path_factory) -> tuple[Path, object, list[str]]:
    """(prepared folder, tokenizer, documents): a decoder-style tokenizer (eos is id 0, no pad token) and a
    RoBERTa-style one (eos ``</s>``, with pad, [CLS]-like ``<s>`` and mask tokens that must not show up)."""
    root = tmp_path_factory.mktemp(f"causal-{request.param}")
    texts = write_corpus(root / "corpus")
    build = decoder_style_tokenizer if request.param == "decoder" else roberta_style_tokenizer
    tokenizer = build([document(i) for i in range(60)])
    tokenizer.save_pretrained(root / "tokenizer")
    # One worker: the pieces (one per file) are written, and read back, in order.
    prepare(
        root / "out",
        str(root / "tokenizer"),
        [str(root / "corpus")],
        max_length=32,
        num_workers=1,
        chunk_blocks=7,
        lm="causal",
    )
    return root / "out", tokenizer, texts


def expected_stream(texts: list[str], tokenizer) -> list[int]:
    """Every document's tokens once, in order, each followed by exactly one end-of-text token."""
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return stream


def check_causal_batches(batches: list[dict], tokenizer, max_length: int) -> list[int]:
    """Checks every batch's layout and labels; returns the tokens of all blocks, padding left out, in order."""
    stream = []
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.dtype == torch.int64 and ids.shape[1] == max_length
        # Labels are the input ids, unshifted (the model shifts), and -100 exactly at padding.
        assert torch.equal(labels, torch.where(mask.bool(), ids, torch.full_like(ids, -100)))
        # Padding only at a block's end; its ids are real ids, so the model can embed them.
        assert (mask.cummin(dim=1).values == mask).all()
        assert ((ids >= 0) & (ids < len(tokenizer))).all()
        for row, row_mask in zip(ids, mask, strict=True):
            stream += row[row_mask.bool()].tolist()
    special = {tokenizer.mask_token_id, tokenizer.cls_token_id, tokenizer.pad_token_id} - {None}
    assert not special & set(stream), "a mask, [CLS] or pad token in causal blocks"
    return stream


def test_prepared_blocks_hold_each_document_once_in_order_between_single_eos(causal):
    folder, tokenizer, texts = causal
    manifest = read_manifest(folder)
    (entry,) = manifest["sources"]
    expected = expected_stream(texts, tokenizer)
    assert (
        manifest["lm"] == "causal" and entry["tokens"] == len(expected) and entry["documents"] == len(texts)
    )
    dm = PretrainingDataModule(prepared=str(folder), max_length=32, batch_size=4, shuffle=False, lm="causal")
    batches = list(dm.train_dataloader())
    assert sum(len(b["input_ids"]) for b in batches) == entry["blocks"]
    assert check_causal_batches(batches, tokenizer, 32) == expected
    # Each file is a piece of work ending in one padded block, so there is padding inside the epoch too.
    padded = [row for b in batches for row in b["attention_mask"] if not row.all()]
    assert len(padded) == FILES


def test_streamed_blocks_hold_each_document_once_in_order_between_single_eos(tmp_path, causal):
    folder, tokenizer, _ = causal
    texts = write_lines(tmp_path / "corpus.txt", 50)
    dm = PretrainingDataModule(
        str(folder / "tokenizer"),
        sources=[str(tmp_path / "corpus.txt")],
        max_length=32,
        batch_size=4,
        repeat=False,
        lm="causal",
    )
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert check_causal_batches(batches, tokenizer, 32) == expected_stream(texts, tokenizer)
    masks = torch.cat([b["attention_mask"] for b in batches])
    assert masks[:-1].all() and not masks[-1].all(), "streamed blocks are full but for the stream's last"


def test_a_llama_loss_on_a_batch_is_the_hand_shifted_cross_entropy(causal):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder, tokenizer, _ = causal
    dm = PretrainingDataModule(prepared=str(folder), max_length=32, batch_size=8, shuffle=False, lm="causal")
    batch = next(b for b in dm.train_dataloader() if not b["attention_mask"].all())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        loss = model(**batch).loss
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # From the inputs alone: position t predicts token t + 1, where t + 1 is not padding.
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = torch.where(mask[:, 1:].bool(), ids[:, 1:], torch.full_like(ids[:, 1:], -100))
    shifted = F.cross_entropy(logits[:, :-1].reshape(-1, config.vocab_size), targets.reshape(-1))
    assert torch.allclose(loss, shifted, atol=1e-5), (loss, shifted)
    # Not vacuous: labels shifted once more (or padding scored) would give another loss.
    twice = F.cross_entropy(logits[:, :-2].reshape(-1, config.vocab_size), targets[:, 1:].reshape(-1))
    assert not torch.allclose(loss, twice, atol=1e-3)


def test_prepared_resume_gives_the_batches_of_an_uninterrupted_run(causal):
    folder, tokenizer, _ = causal
    # Dataloader workers for one tokenizer only: they cost a second or two each time.
    for workers in (0, 2) if tokenizer.pad_token_id is None else (0,):

        def loader(workers: int = workers):
            dm = PretrainingDataModule(
                prepared=str(folder), max_length=32, batch_size=4, num_workers=workers, lm="causal"
            )
            return dm.train_dataloader()

        reference = [b["input_ids"] for b in loader()]
        first = loader()
        for taken, _ in enumerate(first, start=1):
            if taken == 7:
                break
        resumed = loader()
        resumed.load_state_dict(first.state_dict())
        rest = [b["input_ids"] for b in resumed]
        assert len(rest) == len(reference) - 7, workers
        assert all(torch.equal(a, b) for a, b in zip(rest, reference[7:], strict=True)), workers


def test_streamed_resume_continues_where_it_stopped(tmp_path, causal):
    folder, tokenizer, _ = causal
    write_lines(tmp_path / "corpus.txt", 80)

    def module() -> PretrainingDataModule:
        return PretrainingDataModule(
            str(folder / "tokenizer"),
            sources=[str(tmp_path / "corpus.txt")],
            max_length=32,
            batch_size=4,
            repeat=True,
            lm="causal",
        )

    reference = [b["input_ids"] for _, b in zip(range(12), module().train_dataloader(), strict=False)]
    first = module()
    for count, _ in enumerate(first.train_dataloader(), start=1):
        if count == 5:
            break
    resumed = module()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rest = [b["input_ids"] for _, b in zip(range(7), resumed.train_dataloader(), strict=False)]
    assert all(torch.equal(a, b) for a, b in zip(rest, reference[5:], strict=True))


def test_a_folder_prepared_for_the_other_lm_is_refused_with_the_way_out(tmp_path, causal):
    folder, tokenizer, _ = causal
    with pytest.raises(PreparedDataError, match=r"holds causal-LM blocks .* set lm: causal"):
        PretrainingDataModule(prepared=str(folder), max_length=32)
    # A manifest written before causal blocks existed has no "lm": it holds MLM blocks.
    old = tmp_path / "old"
    old.mkdir()
    manifest = read_manifest(folder)
    del manifest["lm"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        PreparedDataError, match=r"not causal-LM blocks .* `lightning-kd prepare --lm causal "
    ):
        PretrainingDataModule(prepared=str(old), max_length=32, lm="causal")
    # Adding to a folder with the other lm is refused before anything is written.
    sources = [entry["source"] for entry in manifest["sources"]]
    with pytest.raises(PreparedDataError, match="lm='causal', not 'mlm'"):
        prepare(folder, str(folder / "tokenizer"), sources, max_length=32, lm="mlm")


def test_a_tokenizer_without_eos_is_refused_naming_the_fix(tmp_path, capsys):
    write_lines(tmp_path / "corpus.txt", 10)
    # MiniLM's tokenizer (BERT's) has [SEP] but no eos token.
    with pytest.raises(ValueError, match=r"no end-of-text \(eos\) token.*add_special_tokens"):
        prepare(tmp_path / "out", TOKENIZER, [str(tmp_path / "corpus.txt")], max_length=32, lm="causal")
    assert not (tmp_path / "out").exists()
    dm = PretrainingDataModule(TOKENIZER, sources=[str(tmp_path / "corpus.txt")], lm="causal")
    with pytest.raises(ValueError, match=r"no end-of-text \(eos\) token"):
        dm.setup("fit")
    args = ["prepare", "--output", str(tmp_path / "cli"), "--tokenizer", TOKENIZER, "--lm", "causal"]
    with pytest.raises(SystemExit, match=r"lightning-kd prepare: .*no end-of-text \(eos\) token"):
        cli_main([*args, "--sources", json.dumps([str(tmp_path / "corpus.txt")])])


def test_cli_prepares_causal_blocks(tmp_path, capsys):
    write_lines(tmp_path / "corpus.txt", 30)
    decoder_style_tokenizer().save_pretrained(tmp_path / "tokenizer")
    out = tmp_path / "out"
    args = ["prepare", "--output", str(out), "--tokenizer", str(tmp_path / "tokenizer"), "--lm", "causal"]
    cli_main([*args, "--sources", json.dumps([str(tmp_path / "corpus.txt")]), "--num_workers", "1"])
    assert "from 30 documents" in capsys.readouterr().out
    assert read_manifest(out)["lm"] == "causal"


def test_settings_that_make_no_sense_for_causal_blocks_are_refused():
    with pytest.raises(ValueError, match="whole_word_masking is MLM masking"):
        PretrainingDataModule(TOKENIZER, sources=["docstrings"], lm="causal", whole_word_masking=True)
    with pytest.raises(ValueError, match="lm: mlm .* or lm: causal"):
        PretrainingDataModule(TOKENIZER, sources=["docstrings"], lm="gpt")
