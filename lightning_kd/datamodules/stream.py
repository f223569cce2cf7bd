"""Packed text streamed from its sources, masked or not, and the stream position a checkpoint keeps.

Each reader (one per rank and dataloader worker) mixes its share of every source by tokens, tokenises
documents in batches with the fast tokenizer, packs the tokens into full ``max_length`` blocks and masks them
for MLM (``[CLS] ... [SEP]`` blocks), or, for causal LMs, joins documents with the end-of-text token and masks
nothing (see :mod:`.causal`). It yields whole batches, each carrying the reader's stream position; the DataLoader
wrapper takes the position off before the batch reaches the model and keeps, as of the last batch the training
loop actually took, each reader's position and which reader's turn is next, which is what the checkpoint stores.

With dataloader workers a DataLoader takes batches from its workers in turn, always starting at worker 0. A
resumed loader therefore hands worker 0 the reader whose turn was next (the readers rotate over the workers), so
the turns go on where they stopped and the resumed run sees exactly the batches of one that never stopped.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_kd.batch import PREDICTION_POSITIONS, as_arrays
from lightning_kd.datamodules.causal import causal_batch, end_of_text, padding_id
from lightning_kd.datamodules.masking import PACKED_KEY, MLMMasking, unpack
from lightning_kd.datamodules.sources import DataSourceError, SourceSpec, read_documents

if TYPE_CHECKING:
    from lightning_kd.datamodules.pretraining import PretrainingDataModule

POSITION_KEY = "_stream_position"
_TOKENIZE_DOCS = 64


def _no_documents(source: SourceSpec, reader: int, readers: int) -> str:
    return (
        f"source {source.name!r} has no documents for reader {reader} of {readers} (ranks x dataloader workers): "
        "it holds fewer documents (or files) than there are readers; use fewer dataloader workers "
        "(num_workers) or ranks, or more data"
    )


def check_every_reader_reads(sources: list[SourceSpec], probabilities: Any, readers: int) -> None:
    """Refuse, in the main process, a repeating stream one of whose ``readers`` would get no document of a source:
    found in a DataLoader worker, the error would arrive wrapped in "Caught DataSourceError in DataLoader worker
    process 1", after the workers started. Hub sources are not read here (that would start streaming them in
    the main process)."""
    for source, share in zip(sources, probabilities, strict=True):
        if share <= 0 or source.kind == "hub":
            continue
        for reader in range(readers):
            if next(read_documents(source, reader, readers), None) is None:
                raise DataSourceError(_no_documents(source, reader, readers))


class PackedMLMStream(IterableDataset):
    """Interleaved sources -> tokens -> full blocks -> masked (or, with ``lm="causal"``, causal) batches,
    resumable per reader."""

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
        lm: str = "mlm",
    ) -> None:
        if lm == "mlm" and tokenizer.mask_token_id is None:
            raise ValueError(
                f"{type(tokenizer).__name__} has no mask token, so it cannot make MLM batches: use the masked "
                "LM's own tokenizer, or lm='causal' for a decoder LM's"
            )
        self.lm = lm
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
        # The reader (of this rank's) that dataloader worker 0 plays: the one whose turn is next on resume.
        self.first_reader = 0
        if lm == "causal":
            # Nothing around a block: a block is a window of the documents, each followed by end of text.
            self.first, self.last, self.separator = None, None, end_of_text(tokenizer)
            self.pad = padding_id(tokenizer)
        else:
            self.first = (
                tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
            )
            self.last = (
                tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
            )
            self.separator, self.pad = self.last, tokenizer.pad_token_id or 0
        self.content = max_length - (self.first is not None) - (self.last is not None)
        if self.content < 1:
            raise ValueError(f"max_length={max_length} leaves no room for text between the special tokens")
        # The Rust tokenizer itself, without the Python wrapper's per-document conversions: tokenising is most
        # of this stream's cost. A copy, so that truncation or padding set elsewhere cannot leak in.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = type(backend).from_str(backend.to_str()) if backend is not None else None
        if self._backend is not None:
            self._backend.no_truncation()
            self._backend.no_padding()
        self.masking = MLMMasking(tokenizer, mlm_probability, whole_word_masking) if lm == "mlm" else None

    def reader(self) -> tuple[int, int]:
        """(this reader's index, number of readers) over all ranks and dataloader workers."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + (worker + self.first_reader) % workers, self.world_size * workers

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
        lengths = torch.tensor([len(block) for block in blocks])
        rows = np.full((len(blocks), self.max_length), self.pad, dtype=np.int64)
        for row, block in zip(rows, blocks, strict=True):
            row[: len(block)] = block
        input_ids = torch.from_numpy(rows)
        attention_mask = (torch.arange(self.max_length) < lengths[:, None]).long()
        position = dict(position, readers=readers, batches=batch_index)
        if self.lm == "causal":
            return {**causal_batch(input_ids, attention_mask), POSITION_KEY: {reader: position}}
        assert self.masking is not None
        # The masking seed depends on where the batch is in the stream, so a resumed run masks alike.
        generator = torch.Generator().manual_seed(hash((self.seed, reader, batch_index)) & (2**62 - 1))
        masked, labels, positions = self.masking(input_ids, generator, attention_mask == 0)
        # One array crosses from a worker to the main process instead of three (see ``as_arrays``).
        return {
            **as_arrays(
                {PACKED_KEY: torch.stack([masked, attention_mask, labels]), PREDICTION_POSITIONS: positions}
            ),
            POSITION_KEY: {reader: position},
        }

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
                    if self.separator is not None:
                        ids.append(self.separator)
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
                    raise DataSourceError(_no_documents(self.sources[choice], reader, readers))
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
                tokens[choice] += len(ids) + (self.separator is not None)
                after = {
                    "read": list(read),
                    "epochs": list(epochs),
                    "alive": list(alive),
                    "tokens": list(tokens),
                }
                yield ids, before, after


class PositionTrackingLoader(DataLoader):
    """A DataLoader that strips the stream position off each batch and records it in the DataModule."""

    def __init__(self, dataset: PackedMLMStream, datamodule: PretrainingDataModule, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, **kwargs)
        self._datamodule = datamodule

    @override
    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        tracker = self._datamodule._tracker
        workers = max(self.num_workers, 1)
        first = self.dataset.rank * workers + self.dataset.first_reader
        tracker.begin(
            self._datamodule._batches_taken(),
            self.dataset.start_positions,
            (first, self.dataset.rank * workers, workers),
        )
        for batch in super().__iter__():
            tracker.record(batch.pop(POSITION_KEY))
            self._used_resume()
            yield unpack(batch, self.pin_memory)
        tracker.finish()
        self._used_resume()  # also when the resumed pass had nothing left

    def _used_resume(self) -> None:
        # The resume position is used once; later epochs start from the top of the stream, at worker 0.
        self.dataset.start_positions = {}
        self.dataset.first_reader = 0
        self._datamodule._resume, self._datamodule._resume_next = {}, []


def first_reader(
    next_readers: list[int], mine: range, start: dict[int, dict[str, Any]], world_size: int
) -> int:
    """Which of this rank's readers (``mine``) dataloader worker 0 plays: the one whose turn was next when the
    checkpoint was taken (``next_readers``, one per rank), or the first when the stream starts afresh."""
    readers = world_size * len(mine)
    if any(position.get("readers") != readers for position in start.values()):
        return 0  # another layout: every reader starts from the top (PackedMLMStream warns)
    for reader in next_readers:
        if reader in mine:
            return reader - mine.start
    return 0


def evaluation_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """A streamed batch for evaluation: unpacked, without the stream position (evaluation never resumes)."""
    batch.pop(POSITION_KEY, None)
    return unpack(batch)


class PositionTracker:
    """Stream positions and the next reader's turn by batch count, so the checkpoint skips batches a prefetcher
    fetched early.

    Each entry of the history is what a checkpoint taken after that many batches must hold: every reader's
    position after its last batch taken, and the reader whose turn comes next (a reader whose stream has ended
    keeps its turn: on resume it ends again at once and the loader passes on, as it did).
    """

    def __init__(self) -> None:
        self.positions: dict[int, dict[str, Any]] = {}
        self.next_reader: int | None = None
        self.history: collections.deque[tuple[int, dict[int, dict[str, Any]], int | None]] = (
            collections.deque(maxlen=64)
        )
        self.taken_at_start: int | None = None
        self.yielded = 0
        self.finished = False
        self.first_local, self.workers = 0, 1

    def begin(self, taken: int | None, start: dict[int, dict[str, Any]], turns: tuple[int, int, int]) -> None:
        """A pass of the loader starts after ``taken`` batches, from the positions ``start``; ``turns``: the
        reader whose turn is first, this rank's first reader, and how many readers take turns."""
        self.taken_at_start, self.yielded, self.finished = taken, 0, False
        self.positions = dict(start)
        self.next_reader, self.first_local, self.workers = turns
        self.history.clear()
        self.history.append((0, dict(self.positions), self.next_reader))

    def record(self, position: dict[int, dict[str, Any]]) -> None:
        self.positions.update(position)
        (reader,) = position
        self.next_reader = self.first_local + (reader - self.first_local + 1) % self.workers
        self.yielded += 1
        self.history.append((self.yielded, dict(self.positions), self.next_reader))

    def finish(self) -> None:
        """Every reader's stream has ended: once the loop has taken all, the next pass starts from the top."""
        self.finished = True

    def consumed(self, taken: int | None) -> tuple[dict[int, dict[str, Any]], int | None]:
        """(every reader's position, the reader whose turn is next) after the batches the loop has taken."""
        count = self.yielded if taken is None or self.taken_at_start is None else taken - self.taken_at_start
        if self.finished and count >= self.yielded:
            return {}, None
        for yielded, positions, next_reader in reversed(self.history):
            if yielded <= count:
                return dict(positions), next_reader
        if self.history:
            return dict(self.history[0][1]), self.history[0][2]
        return dict(self.positions), self.next_reader
