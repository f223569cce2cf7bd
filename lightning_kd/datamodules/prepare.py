"""Tokenise once, train many times: pre-training corpora as LitData token shards.

``prepare`` tokenises every source with the fast tokenizer, in parallel over CPU workers (LitData's
``optimize``), into packed blocks of ``max_length`` tokens stored in LitData's chunk format (``TokensLoader``),
one LitData dataset per source. With ``lm="mlm"`` a block is ``[CLS] ... [SEP]`` with the documents joined by
``[SEP]``, padded with the pad token; with ``lm="causal"`` it is documents joined by the end-of-text token, with
nothing around them, padded with ``PAD_MARK`` (see :mod:`.causal`). A ``manifest.json`` records ``lm``, the
tokenizer (name and vocabulary hash), ``max_length``, the sources and their token counts; the training side
(:class:`~lightning_kd.datamodules.PretrainingDataModule` with ``prepared=``, see :mod:`.prepared`) streams the
blocks with LitData's ``StreamingDataset`` / ``StreamingDataLoader`` and masks MLM blocks at collate time.

Layout of a prepared folder::

    manifest.json        written last: its presence means the folder is complete
    prepare.json         the plan (tokenizer, vocabulary hash, max_length, sources), written first
    tokenizer/           the tokenizer's files, so the folder is self-contained
    00-<source>/         one LitData dataset per source: index.json + chunk-*.bin
    00-<source>.counts/  token and document counts, one file per piece of work
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from litdata import TokensLoader
from transformers import PreTrainedTokenizerBase

from lightning_kd.datamodules.causal import LM, PAD_MARK, check_lm, end_of_text
from lightning_kd.datamodules.common import get_tokenizer, vocabulary_hash
from lightning_kd.datamodules.sources import (
    DEFAULT_HUB_SOURCES,
    DataSourceError,
    parse_source,
    read_documents,
)
from lightning_kd.files import atomic_write, names_write_faults

MANIFEST = "manifest.json"
DONE = "done.json"  # in a source's counts folder once all its pieces are written
PLAN = "prepare.json"
FORMAT = 1
_TOKENIZE_DOCS = 256
_BLOCKS_PER_ITEM = 64


class PreparedDataError(ValueError):
    """A prepared folder that does not match what was asked, or is incomplete."""


def _slug(index: int, source: str | dict[str, Any]) -> str:
    name = (
        source
        if isinstance(source, str)
        else str(source.get("hub") or source.get("path") or source.get("name"))
    )
    cleaned = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")[-40:] or "source"
    return f"{index:02d}-{cleaned}"


def _plan(tokenizer_name: str, vocab: str, max_length: int, sources: list[Any], lm: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "lm": lm,
        "tokenizer": tokenizer_name,
        "vocab_hash": vocab,
        "max_length": max_length,
        "sources": [{"source": source, "folder": _slug(i, source)} for i, source in enumerate(sources)],
    }


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a finished prepared folder (local path, or an fsspec URL such as ``s3://``)."""
    import fsspec

    path = f"{str(folder).rstrip('/')}/{MANIFEST}"
    try:
        with fsspec.open(path, "r", encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise PreparedDataError(
            f"{folder} has no {MANIFEST}: it is not a prepared folder, or `lightning-kd prepare` did not finish "
            f"there. Run `lightning-kd prepare --output {folder} ...` (again: it resumes) first."
        ) from None


def manifest_lm(manifest: dict[str, Any]) -> str:
    """The kind of blocks a folder holds; folders from before causal blocks existed hold MLM blocks."""
    return str(manifest.get("lm", "mlm"))


def _tokenizer_label(tokenizer: str | PreTrainedTokenizerBase) -> str:
    if isinstance(tokenizer, str):
        return tokenizer
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _check_plan(output: Path, plan: dict[str, Any]) -> None:
    """Refuse a folder prepared (or being prepared) with other settings, naming the difference and the fix."""
    existing_path = output / PLAN
    if not existing_path.exists():
        others = [p.name for p in output.iterdir()] if output.exists() else []
        if others:
            raise PreparedDataError(
                f"{output} is not empty ({', '.join(sorted(others)[:5])}...) and is not a prepared folder: "
                "give an empty or new folder for --output"
            )
        return
    existing = json.loads(existing_path.read_text(encoding="utf-8"))
    fix = f"use another --output folder, or delete {output} to prepare it again"
    if existing.get("vocab_hash") != plan["vocab_hash"]:
        raise PreparedDataError(
            f"{output} was prepared with the tokenizer {existing.get('tokenizer')!r} (vocabulary "
            f"{existing.get('vocab_hash')}); refusing to add {plan['tokenizer']!r} (vocabulary {plan['vocab_hash']}): "
            f"{fix}"
        )
    for key in ("lm", "max_length", "sources", "format"):
        theirs = manifest_lm(existing) if key == "lm" else existing.get(key)
        if theirs != plan[key]:
            raise PreparedDataError(f"{output} was prepared with {key}={theirs!r}, not {plan[key]!r}: {fix}")


def _pieces(source: str | dict[str, Any], workers: int) -> int:
    """How many pieces of work a source is cut into: whole files where there are enough of them."""
    spec = parse_source(source)
    if spec.kind == "files":
        return max(len(spec.files), 1) if len(spec.files) >= workers else workers
    return workers * 4 if spec.kind == "hub" else workers


# Tokenizers load once per worker process, not once per piece: copying the Rust tokenizer (to turn off its
# truncation and padding without touching the shared one) took a quarter of a piece's time on a 1.5 MB piece.
_TOKENIZERS: dict[str, tuple[PreTrainedTokenizerBase, Any]] = {}


def _tokenizers(
    name: str, loaded: PreTrainedTokenizerBase | None = None
) -> tuple[PreTrainedTokenizerBase, Any]:
    """The tokenizer and a copy of its Rust tokenizer that neither truncates nor pads, once per process."""
    if name not in _TOKENIZERS:
        tokenizer = loaded if loaded is not None else get_tokenizer(name)
        backend = type(tokenizer.backend_tokenizer).from_str(tokenizer.backend_tokenizer.to_str())
        backend.no_truncation()
        backend.no_padding()
        _TOKENIZERS[name] = tokenizer, backend
    return _TOKENIZERS[name]


def _tokenize_piece(item: dict[str, Any]) -> Iterator[np.ndarray]:
    """LitData's ``fn``: one piece of one source -> packed blocks; counts go to a side file."""
    tokenizer, backend = _tokenizers(item["tokenizer"])
    max_length = item["max_length"]
    if item["lm"] == "causal":
        first, last, separator, pad = None, None, end_of_text(tokenizer), PAD_MARK
    else:
        first, last = tokenizer.cls_token_id, tokenizer.sep_token_id
        separator, pad = last, tokenizer.pad_token_id or 0
    content = max_length - (first is not None) - (last is not None)
    spec = parse_source(item["source"])
    documents = read_documents(spec, item["piece"], item["pieces"])
    buffer: list[int] = []
    tokens = docs = blocks = 0
    rows: list[np.ndarray] = []

    def block(body: list[int]) -> np.ndarray:
        row = ([first] if first is not None else []) + body + ([last] if last is not None else [])
        array = np.full(max_length, pad, dtype=np.int32)
        array[: len(row)] = row
        return array

    while True:
        texts = [text for _, text in zip(range(_TOKENIZE_DOCS), documents, strict=False)]
        for encoding in backend.encode_batch(texts, add_special_tokens=False) if texts else []:
            if encoding.ids:
                buffer.extend(encoding.ids)
                if separator is not None:
                    buffer.append(separator)
                docs += 1
        start = 0
        while len(buffer) - start >= content:
            rows.append(block(buffer[start : start + content]))
            start += content
        del buffer[:start]
        tokens += start
        if len(rows) >= _BLOCKS_PER_ITEM:
            # Several blocks per LitData item: the writer's cost is per item. A whole number of blocks per
            # item keeps every block aligned for TokensLoader, which reads max_length windows.
            blocks += len(rows)
            yield np.concatenate(rows)
            rows = []
        if len(texts) < _TOKENIZE_DOCS:
            break
    if buffer:
        # The piece's last, short block, padded: every token of the corpus is in exactly one block.
        tokens += len(buffer)
        rows.append(block(buffer))
    if rows:
        blocks += len(rows)
        yield np.concatenate(rows)
    counts = Path(item["counts"]) / f"{item['piece']:05d}.json"
    counts.write_text(json.dumps({"tokens": tokens, "documents": docs, "blocks": blocks}))


def no_pypi_lookup() -> None:
    """LitData asks PyPI for a newer version of itself on every ``optimize`` and every ``StreamingDataset``: up to
    30 s each on an offline cluster node. The answer changes nothing here (the version is pinned on purpose)."""
    import litdata.helpers

    litdata.helpers._get_newer_version = lambda version: None


@names_write_faults(
    "prepared folder", "output", "Run the same command again then: the sources that finished are kept."
)
def prepare(
    output: str | os.PathLike,
    tokenizer: str,
    sources: list[str | dict[str, Any]] | None = None,
    max_length: int = 128,
    num_workers: int | None = None,
    chunk_blocks: int = 2048,
    lm: LM = "mlm",
) -> dict[str, Any]:
    """Tokenise ``sources`` into packed ``max_length`` blocks under ``output``; returns the manifest.

    Idempotent: on a finished folder with the same settings it does nothing; on a partly written one it keeps
    the sources that finished and redoes the others (deleting only their own partial folders, which this
    function wrote); a folder of another tokenizer, lm, max_length or source list is refused, naming both.

    Args:
        output: a local (or mounted) folder; copy it to an object store afterwards if training reads from one.
        tokenizer: hub name or folder of the teacher's fast tokenizer.
        sources: as for PretrainingDataModule; ``None``: English Wikipedia and BookCorpus from the hub.
        max_length: tokens per block, [CLS] and [SEP] included (MLM).
        num_workers: CPU processes that tokenise; ``None``: one per CPU.
        chunk_blocks: blocks per LitData chunk file (about 1 MB at 128 tokens).
        lm: ``"mlm"``: ``[CLS] ... [SEP]`` blocks for masked LMs; ``"causal"``: documents joined by the
            tokenizer's end-of-text token, for decoder LMs (a tokenizer without one is refused).
    """
    check_lm(lm)
    if "://" in str(output):
        raise ValueError(
            f"prepare writes a local or mounted folder, not {output}: prepare into a local folder, then copy it "
            "(e.g. `aws s3 sync folder s3://bucket/folder`) and give the URL to PretrainingDataModule(prepared=...)"
        )
    sources = list(sources) if sources is not None else [dict(s) for s in DEFAULT_HUB_SOURCES]
    if not sources:
        raise ValueError(
            "sources is empty: name at least one ('docstrings', a file, a folder or a hub dataset)"
        )
    output = Path(output).expanduser().resolve()
    loaded = get_tokenizer(tokenizer)
    if lm == "causal":
        end_of_text(loaded)
    elif loaded.cls_token_id is None and loaded.bos_token_id is None:
        raise ValueError(
            f"{tokenizer!r} has neither a [CLS] nor a BOS token to start MLM blocks with: use the masked LM's "
            "own tokenizer, or lm='causal' for a decoder LM's"
        )
    plan = _plan(_tokenizer_label(tokenizer), vocabulary_hash(loaded), max_length, sources, lm)
    if lm == "mlm" and max_length < 3:
        raise ValueError(f"max_length={max_length} leaves no room for text between the special tokens")
    if max_length < 2:
        raise ValueError(
            f"max_length={max_length} leaves a causal LM no next token to predict: use at least 2"
        )
    _check_plan(output, plan)
    if (output / MANIFEST).exists():
        return read_manifest(output)
    for source in sources:  # before anything is written, so that the fix is to edit the source list
        spec = parse_source(source)
        if next(read_documents(spec, 0, 1), None) is None:
            raise DataSourceError(
                f"the source {spec.name!r} holds no documents: remove it from sources or fill it"
            )
    output.mkdir(parents=True, exist_ok=True)
    (output / PLAN).write_text(json.dumps(plan, indent=1), encoding="utf-8")
    if not (output / "tokenizer" / "tokenizer.json").exists():
        loaded.save_pretrained(output / "tokenizer")
    # The CPUs this process may use (a SLURM allocation), not the node's.
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, num_workers if num_workers is not None else available)
    # LitData forks its workers: made here, the tokenizer is in each of them without loading it again.
    _TOKENIZERS.pop(str(output / "tokenizer"), None)
    _tokenizers(str(output / "tokenizer"), loaded)
    for source, entry in zip(sources, plan["sources"], strict=True):
        _prepare_source(
            output, entry["folder"], source, str(output / "tokenizer"), max_length, workers, chunk_blocks, lm
        )

    manifest = dict(plan, sources=[])
    for entry in plan["sources"]:
        counts = [
            json.loads(p.read_text())
            for p in sorted((output / f"{entry['folder']}.counts").glob("[0-9]*.json"))
        ]
        manifest["sources"].append(
            dict(
                entry,
                tokens=sum(c["tokens"] for c in counts),
                documents=sum(c["documents"] for c in counts),
                blocks=sum(c["blocks"] for c in counts),
            )
        )
    total = sum(s["tokens"] for s in manifest["sources"])
    for entry in manifest["sources"]:
        entry["share"] = entry["tokens"] / total if total else 0.0
    with atomic_write(output / MANIFEST, "w") as handle:
        handle.write(json.dumps(manifest, indent=1))
    return manifest


def _prepare_source(
    output: Path,
    folder: str,
    source: Any,
    tokenizer: str,
    max_length: int,
    workers: int,
    chunk_blocks: int,
    lm: str,
) -> None:
    from litdata import optimize

    target, counts = output / folder, output / f"{folder}.counts"
    if (target / "index.json").exists() and (counts / DONE).exists():
        return  # finished in an earlier run
    for partial in (target, counts):
        if partial.exists():
            # Written by an interrupted run of this function (the plan file says so): start this source again.
            shutil.rmtree(partial)
    counts.mkdir(parents=True)
    pieces = _pieces(source, workers)
    items = [
        {
            "source": source,
            "tokenizer": tokenizer,
            "max_length": max_length,
            "lm": lm,
            "piece": piece,
            "pieces": pieces,
            "counts": str(counts),
        }
        for piece in range(pieces)
    ]
    no_pypi_lookup()
    with _private_optimizer_cache():
        optimize(
            fn=_tokenize_piece,
            inputs=items,
            output_dir=str(target),
            chunk_size=max_length * chunk_blocks,
            num_workers=min(workers, pieces),
            item_loader=TokensLoader(),
            reorder_files=False,
            start_method="fork",
        )
    if len(list(counts.glob("[0-9]*.json"))) != pieces:
        raise PreparedDataError(
            f"preparing {source!r}: some pieces did not finish; run prepare again to redo it"
        )
    (counts / DONE).write_text(json.dumps({"pieces": pieces}))


@contextmanager
def _private_optimizer_cache() -> Iterator[None]:
    """Give this ``optimize`` call cache folders of its own.

    LitData stages chunks in ``<tmp>/chunks`` and deletes that whole folder when an ``optimize`` starts, so two
    prepares on one machine (two SLURM CPU jobs on a node, say) deleted each other's chunks and one of them
    ended with a chunk its index lists but that was never written.
    """
    names = ("DATA_OPTIMIZER_CACHE_FOLDER", "DATA_OPTIMIZER_DATA_CACHE_FOLDER")
    saved = {name: os.environ.get(name) for name in names}
    with tempfile.TemporaryDirectory(prefix="lightning-kd-prepare-") as folder:
        os.environ[names[0]], os.environ[names[1]] = f"{folder}/chunks", f"{folder}/data"
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
