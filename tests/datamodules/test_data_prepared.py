"""Prepared data: ``prepare`` (LitData ``optimize``) and PretrainingDataModule(prepared=...) on LitData streaming."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers_data import data_trainer
from kd_datafiles import TOKENIZER, document, write_lines
from torch import nn

from lightning_kd.cli import main as cli_main
from lightning_kd.datamodules import DataSourceError, PretrainingDataModule
from lightning_kd.datamodules.prepared import PreparedDataError, prepare, read_manifest


def write_corpus(folder: Path, files: int, documents: int = 120, first: int = 0) -> list[str]:
    texts = []
    for k in range(files):
        part = range(first + k * documents // files, first + (k + 1) * documents // files)
        texts += write_lines(folder / f"part-{k:02d}.txt", len(part), first=part.start)
    return texts


def blocks_of(batches: list[dict]) -> list[tuple[int, ...]]:
    """Each block of each batch, unmasked, without padding."""
    found = []
    for batch in batches:
        ids = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
        for row, mask in zip(ids, batch["attention_mask"], strict=True):
            found.append(tuple(row[mask.bool()].tolist()))
    return found


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    write_corpus(root / "corpus", 3)
    prepare(root / "out", TOKENIZER, [str(root / "corpus")], max_length=32, num_workers=2, chunk_blocks=7)
    return root / "out"


def test_manifest_counts_every_token(tmp_path, tokenizer):
    texts = write_corpus(tmp_path / "corpus", 3)
    manifest = prepare(tmp_path / "out", TOKENIZER, [str(tmp_path / "corpus")], max_length=32, num_workers=2)
    expected = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)  # + [SEP]
    (entry,) = manifest["sources"]
    assert entry["tokens"] == expected and entry["documents"] == len(texts)
    assert (
        manifest["max_length"] == 32
        and manifest["tokenizer"] == TOKENIZER
        and len(manifest["vocab_hash"]) == 16
    )
    assert read_manifest(tmp_path / "out") == manifest
    # Every block is [CLS] ... [SEP]; the text inside, joined, is every document once.
    dm = PretrainingDataModule(prepared=str(tmp_path / "out"), max_length=32, batch_size=8, shuffle=False)
    blocks = blocks_of(list(dm.train_dataloader()))
    assert len(blocks) == entry["blocks"]
    assert all(b[0] == tokenizer.cls_token_id and b[-1] == tokenizer.sep_token_id for b in blocks)
    inner = [t for b in blocks for t in b[1:-1]]
    assert len(inner) == expected
    docs = tokenizer.decode(inner).split(" [SEP]")
    numbers = sorted(int(d.split()[1]) for d in docs if d.strip())
    assert numbers == list(range(len(texts)))


def test_prepare_is_idempotent_resumes_and_refuses_another_tokenizer(tmp_path):
    write_corpus(tmp_path / "a", 2)
    write_corpus(tmp_path / "b", 1, first=500)
    sources = [str(tmp_path / "a"), str(tmp_path / "b")]
    out = tmp_path / "out"
    first = prepare(out, TOKENIZER, sources, max_length=32, num_workers=2)
    chunks = {p: p.stat().st_mtime_ns for p in out.rglob("*.bin")}
    assert prepare(out, TOKENIZER, sources, max_length=32, num_workers=2) == first
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.bin")} == chunks, "a finished folder was rewritten"

    # An interrupted run: the second source has no index and no manifest was written.
    second = out / first["sources"][1]["folder"]
    (second / "index.json").unlink()
    (out / "manifest.json").unlink()
    again = prepare(out, TOKENIZER, sources, max_length=32, num_workers=2)
    assert again == first
    kept = {p: t for p, t in chunks.items() if first["sources"][0]["folder"] in str(p)}
    assert kept and all(p.stat().st_mtime_ns == t for p, t in kept.items()), "a finished source was redone"

    other = tmp_path / "other-tokenizer"
    _wordlevel_tokenizer().save_pretrained(other)
    with pytest.raises(PreparedDataError) as info:
        prepare(out, str(other), sources, max_length=32)
    assert TOKENIZER in str(info.value) and str(other) in str(info.value)
    with pytest.raises(PreparedDataError, match="max_length=32, not 64"):
        prepare(out, TOKENIZER, sources, max_length=64)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(PreparedDataError, match="not empty"):
        prepare(tmp_path / "busy", TOKENIZER, sources, max_length=32)
    # The training side refuses a tokenizer of another vocabulary too.
    with pytest.raises(ValueError, match="prepared with the tokenizer"):
        PretrainingDataModule(str(other), prepared=str(out), max_length=32)
    with pytest.raises(ValueError, match="max_length: 32"):
        PretrainingDataModule(prepared=str(out), max_length=64)


def _wordlevel_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "document": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def test_cli_prepare(tmp_path, capsys):
    write_corpus(tmp_path / "corpus", 2)
    args = [
        "prepare",
        "--output",
        str(tmp_path / "out"),
        "--tokenizer",
        TOKENIZER,
        "--sources",
        json.dumps([str(tmp_path / "corpus")]),
        "--max_length",
        "32",
        "--num_workers",
        "1",
    ]
    cli_main(args)
    assert "blocks from 120 documents" in capsys.readouterr().out
    assert read_manifest(tmp_path / "out")["sources"][0]["documents"] == 120
    with pytest.raises(SystemExit, match="lightning-kd prepare: .*max_length=32, not 16"):
        cli_main([*args[:-4], "--max_length", "16"])


def left_out(blocks: int, batch: int, ranks: int) -> int:
    """Blocks of a pass that LitData's drop_last (on under several ranks) leaves out: each rank gets the same
    whole number of batches, floor(floor(blocks / batch) / ranks), and the rest is read by nobody."""
    return 0 if ranks == 1 else blocks - ranks * batch * (blocks // batch // ranks)


@pytest.mark.parametrize("files", [3, 8])
def test_every_block_once_for_any_ranks_and_workers(tmp_path, files):
    write_corpus(tmp_path / "corpus", files, documents=160)
    out = tmp_path / "out"
    manifest = prepare(
        out, TOKENIZER, [str(tmp_path / "corpus")], max_length=32, num_workers=2, chunk_blocks=16
    )
    # LitData hands out chunks: 3 divides none of the 2, 4 and 8 readers, 8 divides them all.
    assert len(list(out.rglob("chunk-*.bin"))) == files
    total = manifest["sources"][0]["blocks"]
    batch = 4
    reference = None
    failures = []
    for ranks in (1, 2):
        for workers in (0, 1, 2, 4):
            seen = []
            for rank in range(ranks):
                dm = PretrainingDataModule(
                    prepared=str(out), max_length=32, batch_size=batch, num_workers=workers
                )
                seen += blocks_of(list(dm.prepared_loader(rank=rank, world_size=ranks)))
            counts = Counter(seen)
            if reference is None:
                reference = set(counts)
                assert len(seen) == total
            repeated = sum(c - 1 for c in counts.values())
            missing = len(reference - set(counts))
            if repeated or missing != left_out(total, batch, ranks) or not set(counts) <= reference:
                failures.append(
                    f"{ranks} ranks x {workers} workers: {repeated} repeated, {missing} missing "
                    f"(expected {left_out(total, batch, ranks)})"
                )
    assert not failures, failures


def test_sources_mix_by_token_share(tmp_path):
    # Short documents in one source, long ones in the other: a mix by document would miss the shares by far.
    (tmp_path / "long").mkdir()
    (tmp_path / "long" / "long.txt").write_text(
        "\n".join(document(i, words=80) for i in range(1600)) + "\n", encoding="utf-8"
    )
    write_lines(tmp_path / "short" / "short.txt", 12_000, first=20_000)
    out = tmp_path / "out"
    manifest = prepare(
        out, TOKENIZER, [str(tmp_path / "long"), str(tmp_path / "short")], max_length=16, num_workers=2
    )
    for declared in (None, [0.3, 0.7]):
        dm = PretrainingDataModule(
            prepared=str(out), max_length=16, batch_size=64, probabilities=declared, num_workers=1
        )
        loader = dm.train_dataloader()
        for taken, _ in enumerate(loader, start=1):
            if taken == 200:  # 12,800 blocks, well inside the epoch
                break
        state = loader.state_dict()["num_samples_yielded"]
        blocks = [sum(per_worker[k] for per_worker in state.values()) for k in range(2)]
        # Blocks are all max_length tokens (bar each piece's last), so the block share is the token share.
        share = blocks[0] / sum(blocks)
        expected = manifest["sources"][0]["share"] if declared is None else 0.3
        assert abs(share - expected) < 0.01, (declared, share, expected)


class Student(L.LightningModule):
    """Learns from the token ids and the masks, so its final weights depend on every batch and on their order."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(30522, 2)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append(torch.stack([batch["input_ids"], batch["labels"], batch["attention_mask"]]))
        vectors = self.embedding(batch["input_ids"]) * batch["attention_mask"][..., None]
        return (vectors.sum(1) - (batch["labels"] != -100).sum(1, keepdim=True)).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _resumed_runs_match(root: Path, data, stops: tuple[int, ...], steps: int) -> None:
    """Fit ``steps`` straight, checkpointing at each stop (which changes nothing in the run); resume from each
    stop to ``steps``: the same batches (tokens and masks) in the same order, and the same final student."""
    checkpoints = [
        L.pytorch.callbacks.ModelCheckpoint(
            dirpath=root / f"ckpt-{stop}", every_n_train_steps=stop, save_top_k=-1, filename="{step}"
        )
        for stop in stops
    ]
    straight = Student()
    data_trainer(root / "straight", steps, callbacks=checkpoints).fit(straight, datamodule=data())
    assert len(straight.seen) == steps
    for stop in stops:
        resumed = Student()
        data_trainer(root / f"resumed-{stop}", steps, enable_checkpointing=False).fit(
            resumed, datamodule=data(), ckpt_path=root / f"ckpt-{stop}" / f"step={stop}.ckpt"
        )
        assert len(resumed.seen) == steps - stop, stop
        assert all(torch.equal(a, b) for a, b in zip(resumed.seen, straight.seen[stop:], strict=True)), (
            f"resumed at step {stop}: not the batches of the uninterrupted run"
        )
        for mine, theirs in zip(resumed.parameters(), straight.parameters(), strict=True):
            assert torch.equal(mine, theirs), f"resumed at step {stop}: another final student"


@pytest.mark.parametrize("num_workers", [0, 1, 2, 4])
def test_resume_sees_exactly_the_batches_of_an_uninterrupted_run(tmp_path, prepared, num_workers):
    def data() -> PretrainingDataModule:
        return PretrainingDataModule(
            prepared=str(prepared), max_length=32, batch_size=8, num_workers=num_workers
        )

    # 13 batches a pass, the last one short. Step 6 is mid-pass; at step 12 the last round of the pass has begun
    # and some workers have read all of their share (LitData 0.2.44's own resume fails there); step 13 ends the
    # pass. The runs go on into the next pass.
    _resumed_runs_match(tmp_path, data, stops=(6, 12, 13), steps=16)


def test_resume_on_another_layout_goes_on_with_the_next_pass(prepared):
    def loader(world_size: int, workers: int):
        dm = PretrainingDataModule(prepared=str(prepared), max_length=32, batch_size=4, num_workers=workers)
        return dm.prepared_loader(rank=0, world_size=world_size)

    first = loader(1, 0)
    for taken, _ in enumerate(first, start=1):
        if taken == 5:
            break
    state = first.state_dict()
    same = loader(1, 0)
    same.load_state_dict(state)
    assert blocks_of([next(iter(same))]) == blocks_of([next(iter(_skip(loader(1, 0), 5)))])

    for world_size, workers in ((2, 0), (1, 2)):
        other = loader(world_size, workers)
        with pytest.warns(UserWarning, match=r"starts pass 2; about 20 blocks of pass 1 were read"):
            other.load_state_dict(state)
        resumed = blocks_of(list(other))
        fresh = loader(world_size, workers)
        fresh.current_epoch = 1  # the same rank's share of pass 2
        assert resumed == blocks_of(list(fresh))


def _skip(loader, count: int):
    iterator = iter(loader)
    for _ in range(count):
        next(iterator)
    return iterator


def test_prepare_reads_a_hub_dataset_through_datasets(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [document(i) for i in range(90)]
    (tmp_path / "hub").mkdir()
    for k in range(3):  # a hub dataset's parquet files, read by `datasets` as the hub copy would be
        pq.write_table(pa.table({"text": texts[k::3]}), tmp_path / "hub" / f"train-{k:05d}-of-00003.parquet")
    manifest = prepare(
        tmp_path / "out", TOKENIZER, [{"hub": str(tmp_path / "hub")}], max_length=32, num_workers=2
    )
    (entry,) = manifest["sources"]
    assert entry["documents"] == 90
    assert entry["tokens"] == sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)


def _rank_main(rank: int, folder: str, out: str, port: str) -> None:
    import os

    # forked from a process whose OpenMP threads may be running: with one thread no parallel region starts here
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # No rank given: the DataModule takes it from torch.distributed, as under a DDP Trainer.
        dm = PretrainingDataModule(prepared=folder, max_length=32, batch_size=4, num_workers=2)
        blocks = blocks_of(list(dm.train_dataloader()))
        Path(out, f"rank{rank}.json").write_text(json.dumps(blocks))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_read_disjoint_blocks(tmp_path, prepared):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    # forked, not spawned: the ranks start with this process's imports (a spawned rank re-imports torch, Lightning
    # and transformers, most of the test's time); each still joins its own gloo group and reads through LitData
    torch.multiprocessing.start_processes(
        _rank_main, args=(str(prepared), str(tmp_path), port), nprocs=2, join=True, start_method="fork"
    )
    ranks = [[tuple(b) for b in json.loads((tmp_path / f"rank{r}.json").read_text())] for r in range(2)]
    everything = set(
        blocks_of(
            list(
                PretrainingDataModule(prepared=str(prepared), max_length=32, batch_size=4).train_dataloader()
            )
        )
    )
    assert ranks[0] and ranks[1] and len(ranks[0]) == len(ranks[1]), "DDP ranks must take as many batches"
    assert not set(ranks[0]) & set(ranks[1]), "two ranks read the same block"
    assert set(ranks[0]) | set(ranks[1]) <= everything
    assert len(everything - set(ranks[0]) - set(ranks[1])) == left_out(len(everything), 4, 2), (
        "not LitData's drop_last remainder"
    )


def test_resume_with_mixed_sources(tmp_path):
    write_lines(tmp_path / "a" / "a.txt", 150, first=0)
    write_lines(tmp_path / "b" / "b.txt", 100, first=1000)
    prepare(
        tmp_path / "out", TOKENIZER, [str(tmp_path / "a"), str(tmp_path / "b")], max_length=32, num_workers=2
    )

    def data() -> PretrainingDataModule:
        return PretrainingDataModule(
            prepared=str(tmp_path / "out"), max_length=32, batch_size=8, num_workers=2
        )

    # Mixed with weights, the loader has no length, so Lightning fetches a batch ahead of the step, and runs a
    # pass to its end. Stops: mid-pass, and at the pass's last batch (its last ones are short).
    length = sum(1 for _ in data().train_dataloader())
    _resumed_runs_match(tmp_path, data, stops=(6, length), steps=length + 6)


def test_prepare_refuses_an_empty_source(tmp_path):
    write_corpus(tmp_path / "corpus", 1, documents=10)
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataSourceError, match=r"'.*empty\.txt' holds no documents"):
        prepare(
            tmp_path / "out",
            TOKENIZER,
            [str(tmp_path / "corpus"), str(tmp_path / "empty.txt")],
            max_length=32,
        )
    assert not (tmp_path / "out").exists(), "nothing is written before the sources are checked"


@pytest.mark.slow
def test_two_prepares_on_one_machine_do_not_delete_each_others_chunks(tmp_path):
    import subprocess
    import sys

    for name in ("a", "b"):
        write_corpus(tmp_path / f"corpus_{name}", 3, first=1000 if name == "b" else 0)
    script = (
        "import sys; from lightning_kd.datamodules.prepared import prepare; "
        "prepare(sys.argv[1], sys.argv[2], [sys.argv[3]], max_length=32, num_workers=2, chunk_blocks=5)"
    )
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                script,
                str(tmp_path / f"out_{n}"),
                TOKENIZER,
                str(tmp_path / f"corpus_{n}"),
            ]
        )
        for n in ("a", "b")
    ]
    assert [run.wait(timeout=600) for run in runs] == [0, 0]
    for name in ("a", "b"):
        manifest = read_manifest(tmp_path / f"out_{name}")
        dm = PretrainingDataModule(
            prepared=str(tmp_path / f"out_{name}"), max_length=32, batch_size=8, shuffle=False
        )
        assert len(blocks_of(list(dm.train_dataloader()))) == manifest["sources"][0]["blocks"]


def test_blocks_are_read_in_litdata_order_a_chunk_at_a_time(prepared, monkeypatch):
    import litdata.streaming.item_loader as item_loader
    import numpy as np
    from litdata import StreamingDataset, TokensLoader

    from lightning_kd.datamodules.prepared import OwnedBlocksDataset

    (folder,) = [p for p in prepared.iterdir() if (p / "index.json").exists()]

    def read(kind: type) -> list:
        dataset = kind(input_dir=str(folder), item_loader=TokensLoader(block_size=32), shuffle=True, seed=3)
        dataset.set_batch_size(4)
        return [np.array(block) for block in dataset]

    litdata_order = read(StreamingDataset)

    def no_poll(seconds: float) -> None:
        raise AssertionError("LitData polled for a chunk that was complete on disk")

    # LitData checks for a file larger than a whole chunk, then sleeps 0.1 s: once per chunk, worker and pass.
    monkeypatch.setattr(item_loader, "sleep", no_poll)
    ours = read(OwnedBlocksDataset)
    assert len(ours) == len(litdata_order) > 7  # more than one chunk of 7 blocks
    assert all(np.array_equal(a, b) for a, b in zip(ours, litdata_order, strict=True))


def test_workers_hand_over_arrays_and_the_loaders_yield_tensors(prepared, tmp_path):
    """A tensor leaving a worker costs a shared-memory segment and a socket round trip (most of a batch's time
    with one worker); arrays pickle by value. Both loaders turn them back into the model's tensors."""
    import numpy as np

    from lightning_kd.batch import PREDICTION_POSITIONS

    prepared_dm = PretrainingDataModule(prepared=str(prepared), max_length=32, batch_size=4, num_workers=1)
    loader = prepared_dm.train_dataloader()
    made = loader.collate_fn([np.arange(1000, 1032, dtype=np.int32) + i for i in range(4)])
    assert not any(isinstance(value, torch.Tensor) for value in made.values()), made
    write_corpus(tmp_path / "corpus", 2)
    streaming_dm = PretrainingDataModule(
        TOKENIZER, [str(tmp_path / "corpus")], max_length=32, batch_size=4, num_workers=1, repeat=False
    )
    streamed = streaming_dm.train_dataloader()
    assert not any(isinstance(value, torch.Tensor) for value in next(iter(streamed.dataset)).values())
    for batches in (list(loader), list(streamed)):
        assert batches
        for batch in batches:
            assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[1] == 32
            assert batch["labels"].shape == batch["attention_mask"].shape == batch["input_ids"].shape
            flat = (batch["labels"].reshape(-1) != -100).nonzero().squeeze(1)
            assert torch.equal(batch[PREDICTION_POSITIONS], flat)
