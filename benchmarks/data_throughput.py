"""Tokens per second delivered by PretrainingDataModule against the fast tokenizer alone on the same text.

The baseline tokenises the same documents in the same batches (64 documents per call) and does nothing
else; the DataModule also interleaves, packs into full blocks, masks for MLM and collates tensors, in 0, 1
and 2 dataloader workers. The two alternate, in the same process, and each figure is the best of
``--repeats`` runs. Target: ratio >= 0.7.

    python benchmarks/data_throughput.py [--source docstrings] [--tokens 400000]
"""

from __future__ import annotations

import argparse
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


def datamodule(
    name: str, source: str, workers: int, tokens: int, max_length: int, batch: int
) -> tuple[int, float]:
    dm = PretrainingDataModule(
        name, [source], max_length=max_length, batch_size=batch, num_workers=workers, repeat=False
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
            )
            key = f"datamodule, {workers} worker{'s' if workers != 1 else ''}"
            best[key] = max(best.get(key, 0.0), tokens / seconds)

    baseline = best["tokenizer"]
    print(
        f"source={args.source} tokens/run={args.tokens} max_length={args.max_length} batch={args.batch_size} cpus={os.cpu_count()}"
    )
    for key, rate in best.items():
        startup = f"   first batch after {startups[key]:.2f} s" if key in startups else ""
        print(f"{key:24s} {rate / 1e3:9.1f} k tokens/s   ratio {rate / baseline:5.2f}{startup}")
    print("target: ratio >= 0.70 with 1 and 2 workers")


if __name__ == "__main__":
    main()
