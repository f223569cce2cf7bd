"""PretrainingDataModule: packing, masking, sharding across readers, resuming, sources and errors."""

from __future__ import annotations

import json
import time

import pytest
import torch
from helpers_data import documents_by_reader, normalised, unmask
from kd_datafiles import TOKENIZER, document, write_lines
from torch.utils.data import DataLoader

from lightning_kd.datamodules import DataSourceError, PretrainingDataModule
from lightning_kd.datamodules.masking import unpack
from lightning_kd.datamodules.pretraining import POSITION_KEY


def module(sources: list, **kwargs: object) -> PretrainingDataModule:
    settings = dict(tokenizer=TOKENIZER, sources=sources, max_length=32, batch_size=4, repeat=False)
    settings.update(kwargs)
    return PretrainingDataModule(**settings)


def raw_batches(
    dm: PretrainingDataModule, rank: int = 0, world_size: int = 1, num_workers: int = 0
) -> list[dict]:
    """Batches with their stream position still attached, straight from the dataset."""
    dm.train_dataloader()
    dataset = dm._dataset
    dataset.rank, dataset.world_size = rank, world_size
    return [unpack(b) for b in DataLoader(dataset, batch_size=None, num_workers=num_workers)]


def test_batches_are_full_blocks_with_mlm_labels(corpus, tokenizer):
    path, _ = corpus
    batches = list(module([str(path)]).train_dataloader())
    assert len(batches) > 3
    for batch in batches:
        assert set(batch) == {
            "input_ids",
            "attention_mask",
            "token_type_ids",
            "labels",
            "prediction_positions",
        }
        assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape[1] == 32
        # the positions the MLM losses read, computed by the collate function so the device never has to
        assert torch.equal(
            batch["prediction_positions"], (batch["labels"].reshape(-1) != -100).nonzero().flatten()
        )
    # Packing leaves no padding except in the stream's very last block.
    masks = torch.cat([b["attention_mask"] for b in batches])
    assert masks[:-1].all()
    ids, labels = torch.cat([unmask(b) for b in batches]), torch.cat([b["labels"] for b in batches])
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    assert (labels[special] == -100).all()


def test_whole_word_masking_masks_every_piece_of_a_word(tmp_path, tokenizer):
    path = tmp_path / "words.txt"
    path.write_text("\n".join(["unbelievable tokenization extraordinary"] * 200), encoding="utf-8")
    batches = list(module([str(path)], whole_word_masking=True, max_length=64).train_dataloader())
    pieces = tokenizer("unbelievable tokenization extraordinary", add_special_tokens=False)["input_ids"]
    assert len(pieces) > 3, "the words must split into several pieces for this test to mean anything"
    starts = [not tokenizer.convert_ids_to_tokens(p).startswith("##") for p in pieces]
    for batch in batches:
        ids, chosen = unmask(batch), batch["labels"] != -100
        for row in range(ids.shape[0]):
            # A word cut by a block boundary starts its block as a "##" piece; check within blocks.
            for col in range(2, ids.shape[1] - 1):
                token = tokenizer.convert_ids_to_tokens(int(ids[row, col]))
                if token.startswith("##"):
                    assert chosen[row, col] == chosen[row, col - 1], "a word was partly masked"
    assert 0.05 < torch.cat([b["labels"] != -100 for b in batches]).float().mean() < 0.3
    assert any(starts)


def test_token_ids_above_65535_survive(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    vocab.update({f"w{i}": 70_000 + i for i in range(50)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    wide = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    folder = tmp_path / "wide"
    wide.save_pretrained(folder)
    text = tmp_path / "wide.txt"
    text.write_text(
        "\n".join(" ".join(f"w{(i + k) % 50}" for k in range(9)) for i in range(40)), encoding="utf-8"
    )
    batches = list(module([str(text)], tokenizer=str(folder)).train_dataloader())
    ids = torch.cat([unmask(b) for b in batches])
    assert ids.max().item() >= 70_000 and ids.dtype == torch.int64
    assert set(ids[ids > 4].tolist()) <= set(range(70_000, 70_050))


def test_two_ranks_read_disjoint_parts_of_one_file(corpus, tokenizer):
    path, lines = corpus
    seen = {}
    for rank in range(2):
        by_reader = documents_by_reader(raw_batches(module([str(path)]), rank, 2), tokenizer)
        seen.update(by_reader)
    assert sorted(seen) == [0, 1]
    everything = seen[0] + seen[1]
    assert sorted(everything) == sorted(normalised(lines, tokenizer)), "a document was skipped or read twice"
    assert not set(seen[0]) & set(seen[1])


def test_two_workers_per_rank_read_disjoint_parts(corpus, tokenizer):
    path, lines = corpus
    seen = {}
    for rank in range(2):
        seen.update(documents_by_reader(raw_batches(module([str(path)]), rank, 2, num_workers=2), tokenizer))
    assert sorted(seen) == [0, 1, 2, 3]
    everything = [doc for docs in seen.values() for doc in docs]
    assert sorted(everything) == sorted(normalised(lines, tokenizer))


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    # One pass (repeat=False) with 4 workers over documents dealt to the readers in turn, readers 0 and 2 given
    # long ones: readers 1 and 3 run dry first. Stopped where reader 2's turn is next (0 and 1 workers, and
    # turns before any stream ends: under a Trainer in test_data_lightning), the resumed loader must start
    # there, not at worker 0, and pass over the readers that had ended, as the uninterrupted loader did.
    path = tmp_path / "uneven.txt"
    path.write_text("\n".join(document(i, words=60 if i % 2 == 0 else 6) for i in range(64)) + "\n")
    settings = dict(sources=[str(path)], num_workers=4, whole_word_masking=True)
    reference = module(**settings)
    straight = [torch.stack([b["input_ids"], b["labels"]]) for b in reference.train_dataloader()]
    assert reference.state_dict() == {}, "after a whole pass the next one starts from the top"
    readers = [next(iter(batch[POSITION_KEY])) for batch in raw_batches(module(**settings), num_workers=4)]
    assert len(readers) == len(straight)
    # Reader 2's turn next, reader 0's after it: a loader restarting its turns at worker 0 swaps them.
    stop = max(k for k, reader in enumerate(readers) if reader == 2 and 0 in readers[k:])
    assert {1, 3}.isdisjoint(readers[stop:]), "readers 1 and 3 must have run dry before the stop"
    first = module(**settings)
    for count, _ in enumerate(first.train_dataloader(), start=1):
        if count == stop:
            break
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints go through plain containers
    # The reader after the last one taken: 1 or 3 when they had ended (on resume they end again at once).
    assert state["next_readers"] == [(readers[stop - 1] + 1) % 4]
    resumed = module(**settings)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state, (
        "a checkpoint taken before reading on must keep the position and turn"
    )
    loader = resumed.train_dataloader()
    rest = [torch.stack([b["input_ids"], b["labels"]]) for b in loader]
    assert len(rest) == len(straight) - stop
    for k, (batch, expected) in enumerate(zip(rest, straight[stop:], strict=True)):
        assert torch.equal(batch, expected), f"batch {stop + k} differs from the uninterrupted pass's"
    # The next pass starts from the top, its turns at worker 0.
    again = [torch.stack([b["input_ids"], b["labels"]]) for b in loader]
    assert len(again) == len(straight) and all(map(torch.equal, again, straight))


def test_sources_mix_by_token_share(tmp_path, tokenizer):
    # Source a has documents about eight times as long as b's (BookCorpus is one sentence per row): mixing by
    # document would give a far more than 75% of the tokens.
    long_docs = [document(i, words=60) for i in range(200)]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "a.txt").write_text("\n".join(long_docs) + "\n", encoding="utf-8")
    write_lines(tmp_path / "b" / "b.txt", 300, first=1000)
    dm = module(
        [str(tmp_path / "a"), {"path": str(tmp_path / "b" / "*.txt"), "probability": 1.0}],
        probabilities=[3.0, 1.0],
        repeat=True,
        batch_size=8,
        max_length=64,
    )
    dm.train_dataloader()
    batches = [unpack(batch) for _, batch in zip(range(60), dm._dataset, strict=False)]
    docs = documents_by_reader(batches, tokenizer, partial=True)[0]
    tokens = {"a": 0, "b": 0}
    for doc in docs:
        if doc.startswith("document"):
            tokens["a" if int(doc.split()[1]) < 1000 else "b"] += (
                len(tokenizer(doc, add_special_tokens=False)["input_ids"]) + 1
            )
    share_a = tokens["a"] / (tokens["a"] + tokens["b"])
    assert abs(share_a - 0.75) < 0.01, share_a


def test_jsonl_parquet_and_folders(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "a.jsonl", "w") as handle:
        for i in range(20):
            handle.write(json.dumps({"content": document(i)}) + "\n")
    pq.write_table(
        pa.table({"content": [document(i) for i in range(20, 40)]}), tmp_path / "data" / "b.parquet"
    )
    dm = module([{"path": str(tmp_path / "data"), "text_field": "content"}])
    docs = documents_by_reader(raw_batches(dm), tokenizer)[0]
    assert docs == normalised([document(i) for i in range(40)], tokenizer)


def test_docstrings_source(tokenizer):
    dm = module(["docstrings"], max_length=128, batch_size=8, repeat=True)
    dm.prepare_data()
    start = time.perf_counter()
    batch = next(iter(dm.train_dataloader()))
    assert time.perf_counter() - start < 30
    assert batch["input_ids"].shape == (8, 128) and batch["attention_mask"].all()
    text = tokenizer.decode(unmask(batch)[0])
    assert len(text.split()) > 50


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken\n', encoding="utf-8")
    with pytest.raises(DataSourceError, match=r"bad\.jsonl, line 2"):
        list(module([str(path)]).train_dataloader())
    path.write_text('{"text": "fine"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(DataSourceError, match=r"line 2.*'text'"):
        list(module([str(path)]).train_dataloader())


def test_empty_and_missing_inputs(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    # An empty epoch would make a Trainer with max_steps start empty epochs forever at step 0.
    for repeat in (False, True):
        with pytest.raises(DataSourceError, match=r"holds no documents.*empty\.txt"):
            module([str(empty)], repeat=repeat).train_dataloader()
    with pytest.raises(DataSourceError, match="no data files found"):
        module([str(tmp_path / "missing" / "*.txt")]).train_dataloader()
    with pytest.raises(ValueError, match="sources is empty"):
        module([])
    with pytest.raises(ValueError, match="2 probabilities for 1 sources"):
        module([str(empty)], probabilities=[0.5, 0.5])


def test_empty_corpus_under_a_trainer_fails_instead_of_spinning(tmp_path):
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    model = BoringModel()
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(DataSourceError, match="holds no documents"):
        trainer.fit(model, datamodule=module([str(empty)], repeat=False))


def test_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 3)
    with pytest.raises(DataSourceError, match=r"latin1\.txt: not UTF-8"):
        list(module([str(path)]).train_dataloader())


def test_typo_in_a_local_path_is_a_missing_path_not_an_offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_lines(tmp_path / "corpus" / "wiki.txt", 10)
    for typo in (tmp_path / "corpus" / "wiki.txtt", tmp_path / "corpsu" / "wiki.txt", "corpus/wiki.tx"):
        with pytest.raises(DataSourceError) as info:
            module([str(typo)]).train_dataloader()
        assert "no data files found at the local path" in str(info.value), str(info.value)
        assert "cannot be reached" not in str(info.value)


def test_offline_hub_fails_at_once_with_the_way_out(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    dm = PretrainingDataModule(TOKENIZER)  # the default hub corpora
    start = time.perf_counter()
    with pytest.raises(DataSourceError) as info:
        dm.setup("fit")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert (
        "cannot be reached" in message and "sources=['corpus/*.txt']" in message and "docstrings" in message
    )
