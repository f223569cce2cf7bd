"""Packed, masked text for distillation pre-training: from prepared LitData shards, or streamed from text.

Prepared shards (``prepared=``) are read by LitData (see :mod:`.prepared`). Without them, each reader (one
per rank and dataloader worker) mixes its share of every source by tokens, tokenises documents in batches
with the fast tokenizer, packs the tokens into full ``max_length`` blocks and masks them for MLM. It yields whole batches, each carrying the reader's stream position; the DataLoader wrapper
takes the position off before the batch reaches the model and keeps the position of the last batch the
training loop actually took, which is what the checkpoint stores.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from lightning_kd.batch import with_prediction_positions
from lightning_kd.datamodules.common import (
    check_vocabulary,
    distributed_position,
    get_tokenizer,
    pin_memory_default,
)
from lightning_kd.datamodules.masking import PACKED_KEY, continuation_table, mask_tokens, unpack
from lightning_kd.datamodules.sources import (
    DEFAULT_HUB_SOURCES,
    DataSourceError,
    SourceSpec,
    parse_source,
    read_documents,
)

POSITION_KEY = "_stream_position"
_TOKENIZE_DOCS = 64


class PackedMLMStream(IterableDataset):
    """Interleaved sources -> tokens -> full blocks -> masked batches, resumable per reader."""

    def __init__(
        self,
        sources: list[SourceSpec],
        probabilities: list[float],
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        batch_size: int,
        mlm_probability: float,
        whole_word_masking: bool,
        seed: int,
        repeat: bool,
    ) -> None:
        if tokenizer.mask_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no mask token, so it cannot make MLM batches")
        self.sources = sources
        self.probabilities = np.asarray(probabilities, dtype=np.float64)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.mlm_probability = mlm_probability
        self.seed = seed
        self.repeat = repeat
        self.rank, self.world_size = 0, 1
        self.start_positions: dict[int, dict[str, Any]] = {}
        self.first = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        self.last = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        self.content = max_length - (self.first is not None) - (self.last is not None)
        if self.content < 1:
            raise ValueError(f"max_length={max_length} leaves no room for text between the special tokens")
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        # The Rust tokenizer itself, without the Python wrapper's per-document conversions: tokenising is most
        # of this stream's cost. A copy, so that truncation or padding set elsewhere cannot leak in.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = type(backend).from_str(backend.to_str()) if backend is not None else None
        if self._backend is not None:
            self._backend.no_truncation()
            self._backend.no_padding()
        self.continuation = continuation_table(tokenizer) if whole_word_masking else None

    def reader(self) -> tuple[int, int]:
        """(this reader's index, number of readers) over all ranks and dataloader workers."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader, readers = self.reader()
        start = self.start_positions.get(reader)
        if start is not None and "tokens" not in start:
            warnings.warn(
                "the checkpoint's stream position comes from an older version that mixed sources by document; "
                "the stream starts from the beginning",
                stacklevel=2,
            )
            start = None
        if start is not None and start.get("readers") != readers:
            warnings.warn(
                f"the checkpoint's stream position was saved with {start.get('readers')} readers "
                f"(ranks x workers) and this run has {readers}; the stream starts from the beginning",
                stacklevel=2,
            )
            start = None
        yield from self._batches(reader, readers, start)

    def _batches(self, reader: int, readers: int, start: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
        blocks: list[list[int]] = []
        batch_index = start["batches"] if start else 0
        for block, position in self._blocks(reader, readers, start):
            blocks.append(block)
            if len(blocks) == self.batch_size:
                batch_index += 1
                yield self._collate(blocks, reader, readers, batch_index, position)
                blocks = []
        if blocks:
            batch_index += 1
            yield self._collate(blocks, reader, readers, batch_index, position)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if self._backend is None:
            return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [encoding.ids for encoding in self._backend.encode_batch(texts, add_special_tokens=False)]

    def _collate(
        self, blocks: list[list[int]], reader: int, readers: int, batch_index: int, position: dict[str, Any]
    ) -> dict[str, Any]:
        pad = self.tokenizer.pad_token_id or 0
        lengths = torch.tensor([len(block) for block in blocks])
        rows = np.full((len(blocks), self.max_length), pad, dtype=np.int64)
        for row, block in zip(rows, blocks, strict=True):
            row[: len(block)] = block
        input_ids = torch.from_numpy(rows)
        attention_mask = (torch.arange(self.max_length) < lengths[:, None]).long()
        special = torch.isin(input_ids, self.special_ids) | (attention_mask == 0)
        # The masking seed depends on where the batch is in the stream, so a resumed run masks alike.
        generator = torch.Generator().manual_seed(hash((self.seed, reader, batch_index)) & (2**62 - 1))
        masked, labels = mask_tokens(
            input_ids,
            special,
            self.tokenizer.mask_token_id,
            len(self.tokenizer),
            self.mlm_probability,
            generator,
            self.continuation,
        )
        position = dict(position, readers=readers, batches=batch_index)
        # One tensor crosses from a worker to the main process instead of three: each costs a
        # shared-memory segment, which with one worker was a quarter of the time per batch.
        packed = {PACKED_KEY: torch.stack([masked, attention_mask, labels]), POSITION_KEY: {reader: position}}
        return with_prediction_positions(packed, labels)

    def _blocks(
        self, reader: int, readers: int, start: dict[str, Any] | None
    ) -> Iterator[tuple[list[int], dict[str, Any]]]:
        """Full blocks and, with each, the position of the first token not yet in a block."""
        # Entries are [tokens, offset of the first token not yet in a block, position before the document].
        pending: collections.deque[list[Any]] = collections.deque()
        available = 0  # tokens in pending not yet in a block
        documents = self._documents(reader, readers, start)
        skip = start["offset"] if start else 0
        after_last: dict[str, Any] = dict(start) if start else {}
        exhausted = False
        while True:
            if available < self.content and not exhausted:
                for ids, before, after in documents:
                    ids = list(ids)
                    if self.last is not None:
                        ids.append(self.last)
                    pending.append([ids, skip, before])
                    available += len(ids) - skip
                    skip = 0
                    after_last = after
                    if available >= self.content:
                        break
                else:
                    exhausted = True
                continue
            if not pending:
                return
            # The refill above leaves a short block only at the very end of a stream that does not repeat.
            block: list[int] = [] if self.first is None else [self.first]
            need = self.content
            while pending and need:
                entry = pending[0]
                tokens, offset = entry[0], entry[1]
                take = min(need, len(tokens) - offset)
                block.extend(tokens[offset : offset + take])
                entry[1] += take
                need -= take
                available -= take
                if entry[1] >= len(tokens):
                    pending.popleft()
            position = dict(pending[0][2], offset=pending[0][1]) if pending else dict(after_last, offset=0)
            if self.last is not None:
                block.append(self.last)
            yield block, position

    def _documents(
        self, reader: int, readers: int, start: dict[str, Any] | None
    ) -> Iterator[tuple[list[int], dict[str, Any], dict[str, Any]]]:
        """(token ids, position before, position after) of this reader's documents, mixed by token share.

        The next document comes from the source furthest below its share of the tokens taken so far
        (``tokens[i] / share[i]`` smallest), so a source of short documents (BookCorpus's sentences) gets
        its share of the tokens, not of the documents. The choice is a function of the position alone, so a
        resumed reader chooses alike.
        """
        count = len(self.sources)
        read = list(start["read"]) if start else [0] * count
        epochs = list(start["epochs"]) if start else [0] * count
        alive = list(start["alive"]) if start else [True] * count
        tokens = list(start["tokens"]) if start else [0] * count
        streams: list[Iterator[str] | None] = [None] * count
        # Documents read and tokenised ahead, per source; ``read`` counts only those handed on.
        ahead: list[collections.deque[list[int]]] = [collections.deque() for _ in range(count)]
        share = self.probabilities
        while True:
            candidates = [i for i in range(count) if alive[i] and share[i] > 0]
            if not candidates:
                return
            choice = min(candidates, key=lambda i: tokens[i] / share[i])
            if not ahead[choice]:
                if streams[choice] is None:
                    streams[choice] = read_documents(self.sources[choice], reader, readers, read[choice])
                texts = [text for _, text in zip(range(_TOKENIZE_DOCS), streams[choice], strict=False)]
                if texts:
                    ahead[choice].extend(self._encode(texts))
                    continue
                streams[choice] = None
                if self.repeat and read[choice] > 0:
                    epochs[choice] += 1
                    read[choice] = 0
                elif self.repeat:
                    raise DataSourceError(
                        f"source {self.sources[choice].name!r} has no documents for reader {reader} of {readers} "
                        "(ranks x dataloader workers): it is smaller than the number of readers; use fewer "
                        "dataloader workers or ranks, or more data"
                    )
                else:
                    alive[choice] = False
                continue
            ids = ahead[choice].popleft()
            before = {
                "read": list(read),
                "epochs": list(epochs),
                "alive": list(alive),
                "tokens": list(tokens),
            }
            read[choice] += 1
            if ids:
                # One for the separator, so the shares are of the tokens in the blocks.
                tokens[choice] += len(ids) + (self.last is not None)
                after = {
                    "read": list(read),
                    "epochs": list(epochs),
                    "alive": list(alive),
                    "tokens": list(tokens),
                }
                yield ids, before, after


class _PositionTrackingLoader(DataLoader):
    """A DataLoader that strips the stream position off each batch and records it in the DataModule."""

    def __init__(self, dataset: PackedMLMStream, datamodule: PretrainingDataModule, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self._datamodule = datamodule

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        tracker = self._datamodule._tracker
        tracker.begin(self._datamodule._batches_taken())
        for batch in super().__iter__():
            tracker.record(batch.pop(POSITION_KEY))
            batch = unpack(batch)
            # The resume position is used once; later epochs start from the top of the stream.
            self.dataset.start_positions = {}
            self._datamodule._resume = {}
            yield batch


class _Tracker:
    """Stream positions by batch count, so the checkpoint skips batches a prefetcher fetched early."""

    def __init__(self) -> None:
        self.positions: dict[int, dict[str, Any]] = {}
        self.history: collections.deque[tuple[int, dict[int, dict[str, Any]]]] = collections.deque(maxlen=64)
        self.taken_at_start: int | None = None
        self.yielded = 0

    def begin(self, taken: int | None) -> None:
        self.taken_at_start, self.yielded = taken, 0
        self.history.clear()
        self.history.append((0, dict(self.positions)))

    def record(self, position: dict[int, dict[str, Any]]) -> None:
        self.positions.update(position)
        self.yielded += 1
        self.history.append((self.yielded, dict(self.positions)))

    def consumed(self, taken: int | None) -> dict[int, dict[str, Any]]:
        if taken is None or self.taken_at_start is None:
            return dict(self.positions)
        count = taken - self.taken_at_start
        for yielded, positions in reversed(self.history):
            if yielded <= count:
                return dict(positions)
        return dict(self.history[0][1]) if self.history else dict(self.positions)


def _check_counts(**counts: int | tuple[int, int]) -> None:
    """Whole numbers of at least 1 (or of the minimum given as ``(value, minimum)``): a batch size of 0 would
    otherwise spin forever without yielding a batch."""
    for name, given in counts.items():
        value, low = given if isinstance(given, tuple) else (given, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}.")


class PretrainingDataModule(L.LightningDataModule):
    """Packed MLM blocks from a prepared folder (LitData shards) or streamed from text, resumable from checkpoints.

    Args:
        tokenizer: hub name or folder of the teacher's fast tokenizer. With ``prepared``: optional (the folder
            carries its own), and when given it must have the vocabulary the folder was prepared with.
        prepared: a folder written by ``lightning-kd prepare`` (local path or an object-store URL LitData reads,
            such as ``s3://bucket/wiki``). Then ``sources`` and ``repeat`` are not used: blocks stream with LitData
            across every rank and worker, once per epoch, and the loader's position is in the checkpoint.
        shuffle: (prepared data) LitData's shuffle of chunks and of blocks within them, reseeded every epoch.
        sources: ``"docstrings"`` (Python's docstrings, offline), hub dataset names, local files/globs/folders
            (``.txt`` one document per line, ``.jsonl``, ``.parquet``), or dicts (``{"path": ..., "text_field":
            ..., "probability": ...}``, ``{"hub": ..., "config": ..., "split": ...}``,
            ``{"name": "docstrings", "packages": ["stdlib", "numpy"]}``). ``None``: English Wikipedia and
            BookCorpus from the hub.
        probabilities: each source's share of the tokens (normalised); default: equal, or from the dicts. The
            next document comes from the source furthest below its share, so the shares hold within one
            document's tokens, whatever the sources' document lengths.
            With ``prepared``: the token shares of the prepared sources (default: their shares of the
            prepared tokens).
        repeat: cycle the sources forever (train with ``trainer.max_steps``, which also keeps DDP ranks in
            step); ``False`` ends the epoch when every source is read once.
        pin_memory: page-locked batches; ``None`` pins when the trainer runs on CUDA.
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        sources: list[str | dict[str, Any]] | None = None,
        probabilities: list[float] | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        mlm_probability: float = 0.15,
        whole_word_masking: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        repeat: bool = True,
        cache_dir: str | None = None,
        pin_memory: bool | None = None,
        prepared: str | None = None,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        _check_counts(
            max_length=max_length, batch_size=batch_size, num_workers=(num_workers, 0), seed=(seed, 0)
        )
        if isinstance(sources, (str, dict)):
            raise ValueError(f"sources must be a list, e.g. sources: [{sources!r}] (a lone name was given).")
        if isinstance(mlm_probability, bool) or not isinstance(mlm_probability, (int, float)):
            raise ValueError(f"mlm_probability must be a number in (0, 1), got {mlm_probability!r}.")
        self.prepared = str(prepared) if prepared is not None else None
        self.shuffle = shuffle
        self.manifest: dict[str, Any] | None = None
        if self.prepared is not None:
            self.manifest = self._read_prepared(self.prepared, tokenizer, max_length, sources)
            tokenizer = tokenizer if tokenizer is not None else f"{self.prepared.rstrip('/')}/tokenizer"
            sources = [entry["source"] for entry in self.manifest["sources"]]
        if tokenizer is None:
            raise ValueError(
                "name the tokenizer (the teacher's hub name or folder), or pass a prepared folder"
            )
        self.tokenizer_name = tokenizer
        self.sources = list(sources) if sources is not None else [dict(s) for s in DEFAULT_HUB_SOURCES]
        if not self.sources:
            raise ValueError(
                "sources is empty: name at least one ('docstrings', a file, a folder or a hub dataset)"
            )
        self.probabilities = self._probabilities(self.sources, probabilities)
        self.shares = (
            self._probabilities(self.sources, probabilities)
            if probabilities is not None or prepared is None
            else None
        )
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        self.max_length = max_length
        self.batch_size = batch_size
        self.mlm_probability = mlm_probability
        self.whole_word_masking = whole_word_masking
        self.num_workers = num_workers
        self.seed = seed
        self.repeat = repeat
        self.cache_dir = cache_dir
        self.pin_memory = pin_memory
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._specs: list[SourceSpec] | None = None
        self._dataset: PackedMLMStream | None = None
        self._tracker = _Tracker()
        self._resume: dict[int, dict[str, Any]] = {}

    @staticmethod
    def _read_prepared(
        folder: str, tokenizer: Any, max_length: int, sources: list[str | dict[str, Any]] | None
    ) -> dict[str, Any]:
        from lightning_kd.datamodules.prepared import read_manifest, vocabulary_hash

        manifest = read_manifest(folder)
        if manifest["max_length"] != max_length:
            raise ValueError(
                f"{folder} holds blocks of {manifest['max_length']} tokens but max_length={max_length}: set "
                f"max_length: {manifest['max_length']}, or prepare another folder with --max-length {max_length}"
            )
        if sources is not None:
            raise ValueError(
                f"give either sources or prepared, not both: {folder} was prepared from "
                f"{[entry['source'] for entry in manifest['sources']]}"
            )
        if tokenizer is not None:
            mine = vocabulary_hash(get_tokenizer(tokenizer))
            if mine != manifest["vocab_hash"]:
                raise ValueError(
                    f"{folder} was prepared with the tokenizer {manifest['tokenizer']!r} (vocabulary "
                    f"{manifest['vocab_hash']}), not {tokenizer!r} (vocabulary {mine}): its token ids would mean "
                    "other words to this model. Prepare the corpus again with this tokenizer."
                )
        return manifest

    @staticmethod
    def _probabilities(sources: list[str | dict[str, Any]], given: list[float] | None) -> list[float]:
        if given is None:
            given = [float(s.get("probability", 1.0)) if isinstance(s, dict) else 1.0 for s in sources]
        if len(given) != len(sources):
            raise ValueError(f"{len(given)} probabilities for {len(sources)} sources")
        if any(p < 0 for p in given) or sum(given) <= 0:
            raise ValueError(f"probabilities must be non-negative with a positive sum, got {given}")
        return [p / sum(given) for p in given]

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = get_tokenizer(self.tokenizer_name)
        return self._tokenizer

    @property
    def specs(self) -> list[SourceSpec]:
        if self._specs is None:
            self._specs = [parse_source(source, self.cache_dir) for source in self.sources]
        return self._specs

    def prepare_data(self) -> None:
        """Collect the docstrings corpus once, on one process per node."""
        from lightning_kd.datamodules.docstrings import docstrings_path

        if self.prepared is not None:
            return
        for spec in self.specs:
            if spec.kind == "docstrings":
                docstrings_path(spec.packages, spec.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        from lightning_kd.datamodules.sources import load_hub_dataset

        for spec in self.specs if self.prepared is None else []:
            if spec.kind == "hub":
                # Resolving the stream here makes an offline run fail now, with the way out, not in a worker.
                load_hub_dataset(spec.name, spec.config, spec.split, streaming=True)
        trainer = self._trainer_or_none()
        if trainer is not None:
            check_vocabulary(self.tokenizer, trainer.lightning_module)
            if self.prepared is None and self.repeat and trainer.max_steps == -1 and stage == "fit":
                warnings.warn(
                    "the pre-training stream repeats forever (repeat=True), so an epoch never ends: "
                    "set trainer.max_steps, or repeat=False to stop after one pass",
                    stacklevel=2,
                )

    def _trainer_or_none(self) -> Any:
        return getattr(self, "trainer", None)

    def check_not_empty(self) -> None:
        """Fail now when a source holds no document at all.

        Without this, ``repeat=False`` makes an empty epoch, and a Trainer with ``max_steps`` starts empty
        epochs forever at step 0.
        """
        for spec in self.specs:
            if next(read_documents(spec, 0, 1), None) is None:
                where = ", ".join(spec.files) if spec.files else spec.name
                raise DataSourceError(
                    f"the source {spec.name!r} holds no documents (every line or record is empty: {where}); "
                    "remove it from sources or fill it"
                )

    def prepared_loader(self, rank: int = 0, world_size: int = 1, num_nodes: int = 1) -> DataLoader:
        """LitData's loader over the prepared folder, for the reader at ``rank`` of ``world_size``."""
        from lightning_kd.datamodules.prepared import MaskingCollate, PreparedLoader, prepared_datasets

        assert self.prepared is not None and self.manifest is not None
        dataset = prepared_datasets(
            self.prepared, self.manifest, self.shares, self.shuffle, self.seed, rank, world_size, num_nodes
        )
        collate = MaskingCollate(self.tokenizer, self.mlm_probability, self.whole_word_masking, self.seed)
        return PreparedLoader(
            dataset,
            collate,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self._pin_memory(),
        )

    def _pin_memory(self) -> bool:
        return pin_memory_default(self._trainer_or_none()) if self.pin_memory is None else self.pin_memory

    def train_dataloader(self) -> DataLoader:
        if self.prepared is not None:
            trainer = self._trainer_or_none()
            rank, world_size = distributed_position(trainer)
            return self.prepared_loader(rank, world_size, int(getattr(trainer, "num_nodes", 1) or 1))
        self.check_not_empty()
        dataset = PackedMLMStream(
            self.specs,
            self.probabilities,
            self.tokenizer,
            self.max_length,
            self.batch_size,
            self.mlm_probability,
            self.whole_word_masking,
            self.seed,
            self.repeat,
        )
        dataset.rank, dataset.world_size = distributed_position(self._trainer_or_none())
        # Only this rank's readers: the positions of every rank are gathered into one checkpoint.
        workers = max(self.num_workers, 1)
        mine = range(dataset.rank * workers, (dataset.rank + 1) * workers)
        dataset.start_positions = {k: v for k, v in self._resume.items() if k in mine}
        self._tracker.positions = dict(dataset.start_positions)
        self._dataset = dataset
        return _PositionTrackingLoader(
            dataset,
            self,
            num_workers=self.num_workers,
            pin_memory=self._pin_memory(),
            persistent_workers=False,
        )

    def _batches_taken(self) -> int | None:
        """How many batches the training loop has taken so far, when a trainer drives the loader."""
        trainer = self._trainer_or_none()
        if trainer is None:
            return None
        return trainer.fit_loop.epoch_loop.batch_progress.total.ready

    def state_dict(self) -> dict[str, Any]:
        """The stream position of every reader on every rank (gathered, so rank 0's checkpoint has them all).

        Prepared data keeps its position in LitData's loader, whose ``state_dict`` Lightning stores itself.
        """
        if self.prepared is not None:
            return {}
        positions = self._tracker.consumed(self._batches_taken())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, positions)
            positions = {k: v for rank_positions in gathered for k, v in rank_positions.items()}
        if not positions:
            return {}
        return {
            "sources": [spec.name for spec in self.specs],
            "positions": {str(k): v for k, v in positions.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        names = [spec.name for spec in self.specs]
        if state_dict.get("sources") != names:
            warnings.warn(
                f"the checkpoint's stream position is for sources {state_dict.get('sources')}, not {names}; "
                "the stream starts from the beginning",
                stacklevel=2,
            )
            return
        self._resume = {int(k): v for k, v in state_dict["positions"].items()}
        self._tracker.positions = dict(self._resume)
