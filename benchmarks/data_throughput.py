"""Data throughput and coverage, in one run, each rate against a baseline measured in the same process.

1. Streaming path: tokens/s delivered by PretrainingDataModule (tokenise, mix, pack, mask, collate) in 0, 1
   and 2 dataloader workers against the fast tokenizer alone on the same documents (64 per call). Target 0.7.
   ``--whole-word-masking`` measures it with whole-word masking. Then the masking alone (``MLMMasking``, what
   the streaming collate runs: special tokens and padding, the draws, 80/10/10, prediction positions): time
   per ``--batch-size`` x ``--max-length`` batch of the same text, by token and by whole word.
2. ``prepare`` (LitData ``optimize``) tokens/s with 1 and 2 CPU workers, per worker, against the fast
   tokenizer alone on the same documents (written as JSON lines, each whole), separators not counted; the
   start-up and the Rust tokenizer's ``encode_batch`` (a stricter baseline) are printed too. Target >= 0.8
   per worker.
3. Training side from prepared shards: tokens/s per DataLoader worker (LitData streaming + masking at
   collate time). Target >= 2M tokens/s per worker (10x what one GPU consumes in a BERT-base distillation
   step).
4. Streaming path coverage (distinct documents read / documents, and repeats) for ranks x workers in
   {1, 2} x {0, 1, 2, 4}, local text files and a hub stand-in (parquet through ``datasets``), with file counts
   that do and do not divide the readers. Target 1.000 everywhere, no repeats.

The baselines and the measured runs alternate; each figure is the best of ``--repeats`` runs.

    python benchmarks/data_throughput.py [--source docstrings] [--tokens 300000]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lightning_kd.datamodules import PretrainingDataModule  # noqa: E402
from lightning_kd.datamodules.sources import parse_source, read_documents  # noqa: E402
from lightning_kd.hub import load_tokenizer  # noqa: E402


def tokenizer_alone(tokenizer, texts: list[str], chunk: int = 64) -> tuple[int, float]:
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), chunk):
        tokens += sum(
            len(ids)
            for ids in tokenizer(texts[i : i + chunk], add_special_tokens=False, verbose=False)["input_ids"]
        )
    return tokens, time.perf_counter() - start


def rust_tokenizer_alone(tokenizer, texts: list[str], chunk: int = 256) -> tuple[int, float]:
    """What prepare's pieces call: the Rust tokenizer's ``encode_batch``, without the Python wrapper."""
    backend = type(tokenizer.backend_tokenizer).from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), chunk):
        tokens += sum(
            len(e.ids) for e in backend.encode_batch(texts[i : i + chunk], add_special_tokens=False)
        )
    return tokens, time.perf_counter() - start


def datamodule(
    name: str, source: str, workers: int, tokens: int, max_length: int, batch: int, whole_word: bool = False
) -> tuple[int, float]:
    dm = PretrainingDataModule(
        name,
        [source],
        max_length=max_length,
        batch_size=batch,
        num_workers=workers,
        repeat=False,
        whole_word_masking=whole_word,
    )
    batches = iter(dm.train_dataloader())
    next(batches)  # the clock starts at the first batch: worker start-up is paid once per run, not per token
    start, delivered = time.perf_counter(), 0
    for batch_ in batches:
        delivered += int(batch_["attention_mask"].sum())
        if delivered >= tokens:
            break
    return delivered, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--source", default="docstrings")
    parser.add_argument("--tokens", type=int, default=300_000, help="tokens per measured run")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--whole-word-masking", action="store_true", help="streaming path: whole-word masking"
    )
    parser.add_argument(
        "--prepare-copies",
        type=int,
        default=20,
        help="the text, this many times, for prepare (20: 6 M tokens, so that start-up is a small share)",
    )
    parser.add_argument("--parts", default="stream,prepared,coverage", help="which measurements to run")
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.tokenizer)
    spec = parse_source(args.source)
    if spec.kind == "docstrings":
        PretrainingDataModule(args.tokenizer, [args.source]).prepare_data()
    texts, counted = [], 0
    for text in read_documents(spec, 0, 1):
        texts.append(text)
        counted += len(text) // 4  # about four characters per token: enough text for --tokens
        if counted >= args.tokens * 1.3:
            break
    if "stream" in args.parts:
        streaming_throughput(args, texts, tokenizer)
    run_parts(args, texts, tokenizer)


def streaming_throughput(args: argparse.Namespace, texts: list[str], tokenizer) -> None:
    best: dict[str, float] = {}
    startups: dict[str, float] = {}
    for _ in range(args.repeats):
        tokens, seconds = tokenizer_alone(tokenizer, texts)
        best["tokenizer"] = max(best.get("tokenizer", 0.0), tokens / seconds)
        for workers in (0, 1, 2):
            tokens, seconds = datamodule(
                args.tokenizer,
                args.source,
                workers,
                min(tokens, args.tokens),
                args.max_length,
                args.batch_size,
                args.whole_word_masking,
            )
            key = f"datamodule, {workers} worker{'s' if workers != 1 else ''}"
            best[key] = max(best.get(key, 0.0), tokens / seconds)

    baseline = best["tokenizer"]
    print(
        f"source={args.source} tokens/run={args.tokens} max_length={args.max_length} batch={args.batch_size} "
        f"whole_word_masking={args.whole_word_masking} cpus={os.cpu_count()}"
    )
    for key, rate in best.items():
        startup = f"   first batch after {startups[key]:.2f} s" if key in startups else ""
        print(f"{key:24s} {rate / 1e3:9.1f} k tokens/s   ratio {rate / baseline:5.2f}{startup}")
    print("target: ratio >= 0.70 with 1 and 2 workers")
    masking_time(args, texts, tokenizer)


def masking_time(args: argparse.Namespace, texts: list[str], tokenizer) -> None:
    """The streaming collate's masking alone, per batch of the source's text, in this process (one thread)."""
    import timeit

    import torch

    from lightning_kd.datamodules.masking import MLMMasking

    ids = [i for text in texts[:2000] for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    content = args.max_length - 2
    rows = [
        [tokenizer.cls_token_id, *ids[k * content : (k + 1) * content], tokenizer.sep_token_id]
        for k in range(args.batch_size)
    ]
    batch = torch.tensor(rows)
    padding = torch.zeros_like(batch, dtype=torch.bool)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a dataloader worker
    print(f"masking alone (MLMMasking), per {args.batch_size} x {args.max_length} batch, 1 thread:")
    for whole_word in (False, True):
        masking = MLMMasking(tokenizer, 0.15, whole_word)
        seconds = min(
            timeit.repeat(
                lambda m=masking: m(batch, torch.Generator().manual_seed(0), padding), number=200, repeat=5
            )
        )
        per_batch = seconds / 200
        print(
            f"  {'whole words' if whole_word else 'tokens':12s} {per_batch * 1e6:7.0f} us   "
            f"{batch.numel() / per_batch / 1e6:6.1f} M tokens/s"
        )
    torch.set_num_threads(threads)


def run_parts(args: argparse.Namespace, texts: list[str], tokenizer) -> None:
    if "prepared" in args.parts:
        prepared_throughput(args, texts * args.prepare_copies, tokenizer)
    if "coverage" in args.parts:
        coverage(tokenizer)


def prepared_throughput(args: argparse.Namespace, texts: list[str], tokenizer) -> None:
    import shutil
    import tempfile
    from pathlib import Path

    from lightning_kd.datamodules.prepared import prepare

    root = Path(tempfile.mkdtemp(prefix="kd-prepared-"))
    corpus = root / "corpus"
    corpus.mkdir()
    # Eight files, so two workers have whole files to share. JSON lines keep each document whole: written as
    # plain text, a docstring's own line breaks would make five short documents of it, and prepare would
    # tokenise another corpus than the baseline (116 k documents against 23 k: 1.6x the tokenizer's time).
    for k in range(8):
        lines = (json.dumps({"text": text}) for text in texts[k::8])
        (corpus / f"part{k}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rates: dict[str, float] = {}
    per_round: dict[int, list[float]] = {1: [], 2: []}  # each round's prepare against that round's tokenizer
    prepared = root / "prepared-1"
    for _ in range(args.repeats):
        tokens, seconds = tokenizer_alone(tokenizer, texts, chunk=256)
        alone = tokens / seconds
        rates["tokenizer"] = max(rates.get("tokenizer", 0.0), alone)
        tokens, seconds = rust_tokenizer_alone(tokenizer, texts)
        rates["rust"] = max(rates.get("rust", 0.0), tokens / seconds)
        for workers in (1, 2):
            out = root / f"prepared-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # LitData's own progress messages
                manifest = prepare(
                    out, args.tokenizer, [str(corpus)], max_length=args.max_length, num_workers=workers
                )
            seconds = time.perf_counter() - start
            # the blocks' separators (one per document) are not text: the baseline does not count them either
            source = manifest["sources"][0]
            rate = (source["tokens"] - source["documents"]) / seconds
            rates[f"prepare, {workers}"] = max(rates.get(f"prepare, {workers}", 0.0), rate)
            per_round[workers].append(rate / workers / alone)
    print()
    tiny = root / "tiny"
    tiny.mkdir()
    (tiny / "one.txt").write_text("one short document\n", encoding="utf-8")
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        prepare(
            root / "prepared-tiny", args.tokenizer, [str(tiny)], max_length=args.max_length, num_workers=2
        )
    startup = time.perf_counter() - start
    print(
        f"prepare (LitData optimize, start-up included) against the tokenizer alone, per CPU worker, on "
        f"{len(texts)} documents; start-up (a one-document prepare) {startup:.2f} s:"
    )
    for workers in (1, 2):
        rate = rates[f"prepare, {workers}"]
        print(
            f"prepare, {workers} worker{'s' if workers > 1 else ' '}      {rate / 1e3:9.1f} k tokens/s   "
            f"ratio per worker {rate / workers / rates['tokenizer']:5.2f}   median of the rounds' ratios "
            f"{sorted(per_round[workers])[len(per_round[workers]) // 2]:5.2f}"
        )
    print(
        f"tokenizer alone          {rates['tokenizer'] / 1e3:9.1f} k tokens/s   target: ratio per worker >= 0.80"
    )
    print(
        f"Rust tokenizer alone     {rates['rust'] / 1e3:9.1f} k tokens/s   (encode_batch without the Python "
        f"wrapper; prepare per worker against it: {rates['prepare, 1'] / rates['rust']:.2f} with 1 worker, "
        f"{rates['prepare, 2'] / 2 / rates['rust']:.2f} with 2)"
    )

    print()
    print("training side from prepared shards (LitData streaming, MLM masking at collate):")
    for workers in (0, 1, 2):
        best = 0.0
        for _ in range(args.repeats):
            dm = PretrainingDataModule(
                prepared=str(prepared),
                max_length=args.max_length,
                batch_size=args.batch_size,
                num_workers=workers,
            )
            batches = iter(dm.train_dataloader())
            next(batches)
            start, delivered = time.perf_counter(), 0
            for batch in batches:
                delivered += int(batch["attention_mask"].sum())
            best = max(best, delivered / (time.perf_counter() - start))
        per_worker = best / max(workers, 1)
        print(
            f"{workers} worker{'s' if workers != 1 else ' '}  {best / 1e6:6.2f} M tokens/s   {per_worker / 1e6:6.2f} M per worker   target >= 2 M per worker"
        )
    shutil.rmtree(root, ignore_errors=True)


def coverage(tokenizer) -> None:
    """Distinct documents read / documents, and repeats, for ranks x workers; ranks simulated, workers real."""
    import shutil
    import tempfile
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq
    from torch.utils.data import DataLoader

    from lightning_kd.datamodules.masking import unpack
    from lightning_kd.datamodules.pretraining import POSITION_KEY

    root = Path(tempfile.mkdtemp(prefix="kd-coverage-"))
    documents = [f"document {i} " + " ".join(["word"] * (5 + i % 13)) for i in range(600)]
    print()
    print("streaming path coverage: distinct documents read / documents (repeats)")
    print(
        f"{'source':18s}"
        + "".join(f"{r}x{w:<7d}" for r in (1, 2) for w in (0, 1, 2, 4))
        + "  (ranks x workers)"
    )
    for kind in ("local", "hub"):
        for files in (4, 5, 41):
            folder = root / f"{kind}-{files}"
            folder.mkdir()
            for k in range(files):
                part = documents[k::files]
                if kind == "hub":
                    pq.write_table(pa.table({"text": part}), folder / f"train-{k:05d}.parquet")
                else:
                    (folder / f"part{k:02d}.txt").write_text("\n".join(part) + "\n", encoding="utf-8")
            source = {"hub": str(folder)} if kind == "hub" else str(folder)
            row = f"{kind + ', ' + str(files) + ' files':18s}"
            for ranks in (1, 2):
                for workers in (0, 1, 2, 4):
                    seen: list[int] = []
                    for rank in range(ranks):
                        dm = PretrainingDataModule(
                            tokenizer,
                            [source],
                            max_length=128,
                            batch_size=16,
                            repeat=False,
                            num_workers=workers,
                        )
                        dm.train_dataloader()
                        dataset = dm._dataset
                        dataset.rank, dataset.world_size = rank, ranks
                        # Per reader, its blocks joined: a document cut by a block boundary is whole again.
                        streams: dict[int, list[int]] = {}
                        for batch in DataLoader(dataset, batch_size=None, num_workers=workers):
                            (reader,) = batch.pop(POSITION_KEY)
                            batch = unpack(batch)
                            ids = batch["labels"].where(batch["labels"] != -100, batch["input_ids"])
                            for row_ids, mask in zip(ids, batch["attention_mask"], strict=True):
                                streams.setdefault(reader, []).extend(row_ids[mask.bool()][1:-1].tolist())
                        for tokens in streams.values():
                            seen += [int(n) for n in _numbers(tokenizer.decode(tokens))]
                    row += f"{len(set(seen)) / len(documents):5.3f}({len(seen) - len(set(seen))}) "
            print(row)
    shutil.rmtree(root, ignore_errors=True)
    print("target: 1.000 everywhere, no repeats")


def _numbers(text: str) -> list[str]:
    words = text.split()
    return [
        words[i + 1] for i, word in enumerate(words[:-1]) if word == "document" and words[i + 1].isdigit()
    ]


if __name__ == "__main__":
    main()
