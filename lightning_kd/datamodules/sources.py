"""Text sources for pre-training: local files, the docstrings corpus and streamed hub datasets.

Every source is a deterministic sequence of documents, split among readers (one per rank and dataloader
worker) into disjoint parts that together cover it exactly once. With at least as many files (hub: data
shards) as readers, a reader gets whole files, round robin, and opens no other; with fewer, every reader
reads the files and keeps every ``num_shards``-th document. ``start`` skips the documents of that reader
already read, which is how a resumed run continues where it stopped.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}

# The hub corpora behind ``sources=None``: (dataset, config, split, probability).
DEFAULT_HUB_SOURCES: list[dict[str, Any]] = [
    {"hub": "wikimedia/wikipedia", "config": "20231101.en", "split": "train", "probability": 0.5},
    {"hub": "bookcorpus/bookcorpus", "config": None, "split": "train", "probability": 0.5},
]


@dataclass
class SourceSpec:
    """One source, parsed from a string or dict. ``kind`` is docstrings, files or hub."""

    kind: str
    name: str
    files: list[str] = field(default_factory=list)
    text_field: str = "text"
    config: str | None = None
    split: str | None = "train"  # a hub split; for the docstrings, None (all) or train / validation
    packages: list[str] | None = None
    cache_dir: str | None = None


class DataSourceError(ValueError):
    """A source that names nothing readable: a missing path, an unreachable hub dataset, a bad row."""


def text_encoding(path: str | os.PathLike) -> str:
    """The encoding to read a text file with, as the tools that write them mark it: UTF-16 where the file starts
    with its byte-order mark (Excel's "Unicode Text"), else UTF-8 with or without one (Notepad, PowerShell and
    Excel's "CSV UTF-8" start UTF-8 with a mark). Line ends are read as written, CRLF included."""
    with open(path, "rb") as handle:
        start = handle.read(2)
    return "utf-16" if start in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"


def read_text(path: str | os.PathLike) -> str:
    """The whole of a text file (see :func:`text_encoding`), CRLF and CR line ends read as LF; a file in
    another encoding is refused naming the conversion."""
    try:
        with open(path, encoding=text_encoding(path), newline=None) as handle:
            return handle.read()
    except UnicodeDecodeError as error:
        raise DataSourceError(
            f"{path}: not UTF-8 or UTF-16 text ({error.reason} at byte {error.start}); save it as UTF-8, e.g. "
            "`iconv -f latin1 -t utf-8 in.tsv > out.tsv`"
        ) from None


def parse_source(source: str | dict[str, Any], cache_dir: str | None = None) -> SourceSpec:
    """``"docstrings"``, a local path/glob/folder, a hub dataset name, or a dict with the details.

    Dict keys: ``path`` (local) or ``hub`` (dataset name) or ``name``; ``text_field``; ``config``; ``split``;
    ``packages`` and ``split`` (docstrings: ``train`` or the held-out ``validation``, see
    :func:`~lightning_kd.datamodules.docstrings.docstrings_path`); ``probability`` is read by the caller.
    """
    if isinstance(source, str):
        source = {"name": source}
    details = {key: value for key, value in dict(source).items() if key != "probability"}
    name = str(details.pop("hub", None) or details.pop("path", None) or details.pop("name", None) or "")
    if not name:
        raise DataSourceError(f"a source needs 'name', 'path' or 'hub': got {source!r}")
    common = {k: details[k] for k in ("text_field",) if k in details}
    if name == "docstrings":
        return SourceSpec(
            "docstrings",
            name,
            packages=details.get("packages"),
            cache_dir=details.get("cache_dir", cache_dir),
            split=details.get("split"),
        )
    if "hub" not in source and _looks_local(name):
        return SourceSpec("files", name, files=expand_files(name), **common)
    return SourceSpec(
        "hub", name, config=details.get("config"), split=details.get("split", "train"), **common
    )


def _looks_local(name: str) -> bool:
    # A hub name is ``dataset`` or ``owner/dataset``; anything with a deeper path, a folder that exists here or
    # a file-like suffix is a local path, so a typo in it is reported as a missing file, not an offline hub.
    path = Path(os.path.expanduser(name))
    return (
        path.exists()
        or any(ch in name for ch in "*?[")
        or name.startswith((".", "/", "~"))
        or name.count("/") >= 2
        or "\\" in name
        or (path.parent != Path(".") and path.parent.is_dir())
        or bool(re.fullmatch(r"\.[A-Za-z][A-Za-z0-9]{0,7}", path.suffix))
    )


# Files a corpus folder holds beside its data that are never data, whatever their extension.
NOT_DATA = re.compile(
    r"(readme|license|licence|changelog|notice|citation|dataset_info|state|dataset_dict)\b", re.I
)


def _folder_files(folder: Path) -> list[str]:
    """A folder's data files, by extension: ``.json`` files beside ``.jsonl``, ``.parquet`` or ``.txt`` data are
    metadata (a dataset card's ``dataset_info.json``, say), as are README, LICENSE and hidden files."""
    found = [p for p in folder.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES]
    found = [p for p in found if not NOT_DATA.match(p.name) and not p.name.startswith(".")]
    if any(p.suffix != ".json" for p in found):
        found = [p for p in found if p.suffix != ".json"]
    return sorted(str(p) for p in found)


def _glob_without(file: str) -> str:
    """A glob for the files beside ``file`` with its extension but not ``file`` itself (their common prefix),
    or a generic one when their names share none."""
    path = Path(file)
    others = sorted(p.name for p in path.parent.glob(f"*{path.suffix}") if p.name != path.name)
    prefix = os.path.commonprefix(others)
    if others and prefix and not path.name.startswith(prefix):
        return f"{path.parent}/{prefix}*{path.suffix}"
    return f"{path.parent}/*.jsonl"


def expand_files(pattern: str) -> list[str]:
    """Sorted data files behind a path, a folder (searched recursively, by its data files' extension) or a
    glob."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = _folder_files(path)
    elif path.is_file():
        files = [str(path)]
    else:
        files = sorted(p for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
    if not files:
        raise DataSourceError(
            f"no data files found at the local path {pattern!r}: give an existing file, a folder that holds "
            f"{', '.join(sorted(TEXT_SUFFIXES))} files, or a glob such as 'corpus/*.txt' "
            "(for a hub dataset, write {'hub': name})"
        )
    return files


def read_documents(spec: SourceSpec, shard: int, num_shards: int, start: int = 0) -> Iterator[str]:
    """The documents ``shard, shard + num_shards, ...`` of a source, skipping the first ``start`` of them."""
    if spec.kind == "hub":
        yield from _read_hub(spec, shard, num_shards, start)
        return
    files = _local_files(spec)
    if len(files) >= num_shards:
        # Whole files, round robin: no reader opens a file another reader reads.
        files, shard, num_shards = files[shard::num_shards], 0, 1
    skip = shard + start * num_shards
    # JSON lines are parsed only when this shard keeps them.
    for index, item in enumerate(_local_items(files)):
        if index >= skip and (index - shard) % num_shards == 0:
            yield item if isinstance(item, str) else _parse_json_line(*item)


def _local_files(spec: SourceSpec) -> list[tuple[str, str, str]]:
    """(file, kind, text field) per file; the docstrings corpus is one JSON lines file with a ``text`` field."""
    if spec.kind == "docstrings":
        from lightning_kd.datamodules.docstrings import docstrings_path

        return [(str(docstrings_path(spec.packages, spec.cache_dir, split=spec.split)), "jsonl", "text")]
    return [(file, TEXT_SUFFIXES.get(Path(file).suffix, "text"), spec.text_field) for file in spec.files]


def _local_items(files: list[tuple[str, str, str]]) -> Iterator[str | tuple[str, int, str, str]]:
    """Documents as text, or (file, line number, raw JSON line, field) to parse when kept."""
    for file, kind, text_field in files:
        yield from _file_items(file, kind, text_field)


def _file_items(file: str, kind: str, text_field: str) -> Iterator[str | tuple[str, int, str, str]]:
    if kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(file)
        if text_field not in table.schema_arrow.names:
            raise DataSourceError(
                f"{file}: no column {text_field!r} (columns: {table.schema_arrow.names}); "
                "set text_field in the source dict"
            )
        for batch in table.iter_batches(columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if text and text.strip():
                    yield text
        return
    number = 0
    try:
        with open(file, encoding=text_encoding(file)) as handle:
            if kind == "jsonl" and file.endswith(".json") and _starts_with(handle, "["):
                yield from _json_array_texts(file, handle, text_field)
                return
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield line.rstrip("\n") if kind == "text" else (file, number, line, text_field)
    except UnicodeDecodeError as error:
        raise DataSourceError(
            f"{file}: not UTF-8 text ({error.reason}, after line {number}); the corpus files must be UTF-8: "
            "convert this one, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`"
        ) from None


def _starts_with(handle: Any, char: str) -> bool:
    """Whether the text file's first non-blank character is ``char``; the file is read again from its start."""
    head = handle.read(4096).lstrip()
    handle.seek(0)
    return head.startswith(char)


def _json_array_texts(file: str, handle: Any, text_field: str) -> Iterator[str]:
    """The texts of a ``.json`` file holding one array of records (``json.dump(records)``, pandas'
    ``to_json(orient="records")``) or of strings."""
    try:
        records = json.load(handle)
    except json.JSONDecodeError as error:
        raise DataSourceError(f"{file}, line {error.lineno}: not valid JSON ({error.msg})") from None
    for index, record in enumerate(records):
        text = (
            record
            if isinstance(record, str)
            else record.get(text_field)
            if isinstance(record, dict)
            else None
        )
        if not isinstance(text, str):
            raise DataSourceError(
                f"{file}, record {index}: no string field {text_field!r}; set text_field in the source dict"
            )
        if text.strip():
            yield text


def _parse_json_line(file: str, number: int, line: str, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataSourceError(
            f"{file}, line {number}: not valid JSON lines ({error.msg}){_not_data(file)}"
        ) from None
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise DataSourceError(
            f"{file}, line {number}: no string field {text_field!r}; set text_field in the source dict"
            f"{_not_data(file)}"
        )
    return text


def _not_data(file: str) -> str:
    # a JSON file that is not JSON lines is usually not data either (metadata): a glob of the data files skips it
    return f"; if {file} is not part of the corpus, name the data files with a glob such as {_glob_without(file)!r}"


def hub_offline_error(name: str, cause: BaseException | str) -> DataSourceError:
    return DataSourceError(
        f"the hub dataset {name!r} cannot be reached ({type(cause).__name__ if isinstance(cause, BaseException) else cause}). "
        "This machine looks offline. Point the DataModule at local files instead, e.g.\n"
        "  PretrainingDataModule(tokenizer=..., sources=['corpus/*.txt'])      # text, jsonl or parquet files\n"
        "  PretrainingDataModule(tokenizer=..., sources=['docstrings'])        # Python's docstrings, always offline\n"
        "  GLUEDataModule(task='mrpc', tokenizer=..., data_dir='glue_data/MRPC')  # GLUE's TSV layout\n"
        "or, where there is a network, save the data as files (text/jsonl/parquet for pre-training; for GLUE, "
        "the TSV folders that GLUE's download script writes) and pass them the same way."
    )


def hub_unreachable_reason() -> str | None:
    """``None`` when hub datasets can be fetched, else why not; fast, so an offline run fails at once."""
    if os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in {"1", "true", "yes"} or os.environ.get(
        "HF_HUB_OFFLINE", "0"
    ).lower() in {"1", "true", "yes"}:
        return "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set"
    from lightning_kd.hub import hub_reachable

    return hub_reachable().reason


def load_hub_dataset(
    name: str, config: str | None = None, split: str | None = None, streaming: bool = False
) -> Any:
    """``datasets.load_dataset`` that fails at once, with the way out, when the hub cannot be reached."""
    import datasets

    reason = hub_unreachable_reason()
    if reason is not None:
        # A dataset already in the local cache still loads without the network.
        try:
            return _quiet_offline_load(datasets, name, config, split, streaming)
        except Exception:
            raise hub_offline_error(name, reason) from None
    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except (ConnectionError, OSError) as error:
        raise hub_offline_error(name, error) from None


def _quiet_offline_load(
    datasets: Any, name: str, config: str | None, split: str | None, streaming: bool
) -> Any:
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _read_hub(spec: SourceSpec, shard: int, num_shards: int, start: int) -> Iterator[str]:
    from datasets.distributed import split_dataset_by_node

    dataset = load_hub_dataset(spec.name, spec.config, spec.split, streaming=True)
    if spec.text_field not in (dataset.column_names or [spec.text_field]):
        raise DataSourceError(
            f"the dataset {spec.name!r} has no column {spec.text_field!r} (columns: {dataset.column_names}); "
            "set text_field in the source dict"
        )
    dataset = dataset.select_columns([spec.text_field])
    if dataset.num_shards < num_shards:
        # Parquet files split further by row group, which may give every reader whole shards after all.
        try:
            dataset = dataset.reshard()
        except NotImplementedError:
            pass
    if dataset.num_shards >= num_shards:
        # Whole shards, round robin: no reader opens a file another one reads.
        dataset = dataset.shard(num_shards=num_shards, index=shard, contiguous=False)
    else:
        dataset = split_dataset_by_node(dataset, rank=shard, world_size=num_shards)
    # ``iter`` rather than ``for record in dataset``: inside a DataLoader worker the latter splits the shards
    # among the workers a second time, and this reader index already counts the worker.
    kept = 0
    for batch in dataset.iter(batch_size=256):
        for text in batch[spec.text_field]:
            if isinstance(text, str) and text.strip():
                # ``start`` counts documents, which skips records without text too; ``dataset.skip`` would not.
                if kept >= start:
                    yield text
                kept += 1
