"""Reading prepared folders back: LitData datasets over the shards, masking at collate time, a resumable loader.

Causal-LM folders (``lm: causal``) are read by the same datasets and loader with
:class:`~lightning_kd.datamodules.causal.CausalCollate` in place of :class:`MaskingCollate`.

The folders are written by :func:`~lightning_kd.datamodules.prepare.prepare` (``lightning-kd prepare``), whose
module describes their layout and the manifest.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset, TokensLoader
from litdata.streaming.sampler import ChunkedIndex
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_kd.batch import as_arrays, with_prediction_positions
from lightning_kd.datamodules.masking import PACKED_KEY, continuation_table, mask_tokens, unpack
from lightning_kd.datamodules.prepare import PreparedDataError, no_pypi_lookup, prepare, read_manifest

# ``prepare``, ``read_manifest`` and ``PreparedDataError`` were defined here before the writing side moved to
# :mod:`.prepare`; they stay importable from here.
__all__ = [
    "MaskingCollate",
    "OwnedBlocksDataset",
    "PreparedDataError",
    "PreparedLoader",
    "prepare",
    "prepared_datasets",
    "read_manifest",
]


class MaskingCollate:
    """Blocks -> an MLM batch, at collate time, so one prepared corpus serves any masking rate and seed.

    The masking generator is seeded by (seed, epoch, the batch's tokens): a resumed run masks a batch exactly as
    a run that never stopped, and a block seen again in a later pass gets a new mask.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, mlm_probability: float, whole_word_masking: bool, seed: int
    ) -> None:
        if tokenizer.mask_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no mask token, so it cannot make MLM batches")
        self.pad = tokenizer.pad_token_id or 0
        self.mask_token_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.mlm_probability = mlm_probability
        self.continuation = continuation_table(tokenizer) if whole_word_masking else None
        self.seed = seed
        self.epoch = 0

    def __call__(self, blocks: list[Any]) -> dict[str, Any]:
        input_ids = torch.from_numpy(np.stack([np.asarray(block) for block in blocks]).astype(np.int64))
        attention_mask = (input_ids != self.pad).long()
        special = torch.isin(input_ids, self.special_ids) | (attention_mask == 0)
        weights = torch.arange(1, input_ids.numel() + 1, dtype=torch.long).view_as(input_ids)
        fingerprint = int(((input_ids + 1) * weights).sum()) & (2**61 - 1)
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, fingerprint)) & (2**62 - 1))
        masked, labels = mask_tokens(
            input_ids,
            special,
            self.mask_token_id,
            self.vocab_size,
            self.mlm_probability,
            generator,
            self.continuation,
        )
        # One array crosses from a worker to the main process instead of four; the loader unpacks it into views.
        packed = {PACKED_KEY: torch.stack([masked, attention_mask, labels])}
        return as_arrays(with_prediction_positions(packed, labels))


class OwnedBlocksDataset(StreamingDataset):
    """LitData's StreamingDataset, read a chunk at a time, counting the blocks each reader took.

    LitData reads one block per call (an index lookup, a ``stat`` of the chunk file and a ``frombuffer`` each:
    about 100 µs, as long as masking a batch); this reads a worker's whole share of a chunk at its first block,
    in LitData's (shuffled) order, with one gather into memory of its own. Owning the rows matters: LitData's
    blocks are views of the chunk's memory map, which it unmaps once read while a batch being collated still
    holds them (a segfault). Placement on ranks and workers, shuffling and the order of blocks are LitData's.

    ``taken`` counts the blocks this reader handed out in this pass; the loader carries it with every batch, so
    that a checkpoint knows exactly how far each worker read (see :class:`PreparedLoader`).
    """

    taken = 0

    @override
    def __iter__(self) -> OwnedBlocksDataset:
        self._rows: np.ndarray | None = None
        self._next_row = 0
        self.taken = 0  # a resumed pass sets it in _resume
        super().__iter__()
        return self

    @override
    def __next__(self) -> np.ndarray:
        if self._rows is None or self._next_row == len(self._rows):
            self._rows, self._next_row = self._read_share_of_chunk(), 0
        row = self._rows[self._next_row]
        self._next_row += 1
        self.taken += 1
        return row

    def _read_share_of_chunk(self) -> np.ndarray:
        """LitData's ``__next__`` bookkeeping, for every block of this worker's share of the next chunk at once."""
        while not len(self.current_indexes):
            if self.global_index >= self.stop_length or self.chunk_index == self.num_chunks:
                self.current_epoch += 1
                self.reset_state_dict()
                raise StopIteration
            interval = self.worker_intervals[self.chunk_index]
            self.current_indexes = self.shuffler(
                np.arange(interval[1], interval[2]), self.num_chunks, self.current_epoch, self.chunk_index
            )
            self.chunk_index += 1
        indexes = np.asarray(self.current_indexes[: max(self.stop_length - self.global_index, 0)])
        self.current_indexes = []
        if not len(indexes):
            return self._read_share_of_chunk()
        chunk = self.worker_chunks[self.chunk_index - 1]
        where = ChunkedIndex(
            index=int(indexes[0]),
            chunk_index=chunk,
            # The chunks to download ahead, told once, as LitData does.
            chunk_indexes=None if self.has_triggered_download else self.worker_chunks[self.chunk_index - 1 :],
        )
        reader = self.cache._reader
        loader = reader._item_loader
        path, begin, size = reader.config[where]
        if os.path.isfile(path) and os.stat(path).st_size >= size:
            # LitData 0.2.44 first checks for a size above the index's (a whole chunk has exactly that size),
            # then sleeps 0.1 s and checks again: once per chunk, per worker and per pass, as long as reading
            # 2 M tokens. A complete chunk is ready; one still downloading takes LitData's way.
            loader._chunk_filepaths[path] = True
        first = np.asarray(self.__getitem__(where))  # LitData downloads (if remote) and maps the chunk
        self.has_triggered_download = True
        width = loader._block_size
        tokens = np.frombuffer(loader._buffers[chunk], dtype=loader._dtype)
        rows = tokens[: len(tokens) // width * width].reshape(-1, width)[indexes - begin]
        if not np.array_equal(rows[0], first):
            raise RuntimeError(
                "LitData's token chunk layout is not the one lightning-kd reads in bulk (written for litdata "
                "0.2.44, pinned in constraints.txt): install that version"
            )
        self.global_index += len(indexes)
        self.index += len(indexes)
        return rows

    @override
    def _resume(self, workers_chunks: list[list[int]], workers_intervals: list[Any]) -> None:
        # LitData 0.2.44 works out how far each worker read from the total, as if every batch were whole and
        # came from one dataset (mixed with weights, a batch takes some blocks from each source; a pass's last
        # batches are short), and fails on a worker that had read all of its share. PreparedLoader hands each
        # dataset the exact count per worker, carried by the batches; this skips exactly that many.
        exact = (self._state_dict or {}).get("samples_per_worker")
        if exact is None:  # a checkpoint written before the exact counts were kept
            super()._resume(workers_chunks, workers_intervals)
            return
        worker = self.worker_env.rank
        reader = self.distributed_env.global_rank * self.worker_env.world_size + worker
        self.worker_chunks, self.worker_intervals = workers_chunks[reader], workers_intervals[reader]
        self.num_chunks = len(self.worker_intervals)
        self.taken = self.global_index = skip = int(exact.get(worker, exact.get(str(worker), 0)))
        self.chunk_index, self.current_indexes = 0, []
        while self.chunk_index < self.num_chunks:
            interval = self.worker_intervals[self.chunk_index]
            if skip < interval[2] - interval[1]:
                order = self.shuffler(
                    np.arange(interval[1], interval[2]), self.num_chunks, self.current_epoch, self.chunk_index
                )
                self.current_indexes = list(order[skip:])
                self.chunk_index += 1
                break
            skip -= interval[2] - interval[1]
            self.chunk_index += 1
        self.index = skip


def prepared_datasets(
    folder: str,
    manifest: dict[str, Any],
    shares: list[float] | None,
    shuffle: bool,
    seed: int,
    rank: int,
    world_size: int,
    num_nodes: int,
) -> Any:
    """LitData datasets over a prepared folder: one per source, mixed by token share when there are several.

    Blocks are all ``max_length`` long, so drawing blocks with the token shares as weights mixes by tokens.
    """
    from litdata import CombinedStreamingDataset
    from litdata.utilities.env import _DistributedEnv

    no_pypi_lookup()
    datasets = []
    for entry in manifest["sources"]:
        dataset = OwnedBlocksDataset(
            input_dir=f"{folder.rstrip('/')}/{entry['folder']}",
            item_loader=TokensLoader(block_size=manifest["max_length"]),
            shuffle=shuffle,
            # Every rank must take the same number of batches under DDP; LitData's documented way is drop_last.
            drop_last=world_size > 1,
            seed=seed,
        )
        # The Trainer's placement, not LitData's own detection (which knows nothing before DDP starts).
        dataset.distributed_env = _DistributedEnv(
            world_size=world_size, global_rank=rank, num_nodes=num_nodes
        )
        datasets.append(dataset)
    if len(datasets) == 1:
        return datasets[0]
    weights = shares if shares is not None else [entry["share"] for entry in manifest["sources"]]
    return CombinedStreamingDataset(datasets, seed=seed, weights=weights, iterate_over_all=False)


READER_KEY = "_reader"


def _has_length(loader: Any) -> bool:
    try:
        len(loader)
    except TypeError:  # LitData's loader over datasets mixed with weights
        return False
    return True


class _CountingCollate:
    """The collate function, run where the batch is made (a worker), adding which worker made it and how many
    blocks that worker had taken from each source by then: the checkpoint's exact position."""

    def __init__(self, collate: Any, dataset: Any) -> None:
        self.collate = collate
        self.dataset = dataset

    def __call__(self, blocks: list[Any]) -> dict[str, Any]:
        batch = self.collate(blocks)
        info = torch.utils.data.get_worker_info()
        dataset = info.dataset if info is not None else self.dataset
        taken = [int(part.taken) for part in getattr(dataset, "_datasets", [dataset])]
        # Plain ints, pickled with the batch: a tensor would cost a shared-memory segment of its own.
        batch[READER_KEY] = [info.id if info is not None else 0, *taken]
        return batch


class PreparedLoader(StreamingDataLoader):
    """LitData's loader, telling the masking collate function which epoch it is in, with an exact position.

    Lightning stores a resumable loader's ``state_dict`` in the checkpoint (``loops.fit_loop.state_dict.
    combined_loader``) and restores it on resume. LitData's own state assumes every batch holds ``batch_size``
    blocks of one dataset from the worker after the previous one's; the state here adds what is exact: the
    number of batches, the worker of the last one, and the blocks each worker took from each source, from the
    batches themselves. ``consumed`` (given by the DataModule) says how many batches of this pass the training
    loop has taken, which is fewer than the loader yielded when Lightning fetched one ahead (it does so when
    the loader has no length, as with mixed sources).
    """

    def __init__(
        self, dataset: Any, collate: Any, consumed: Callable[[], int | None] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(dataset, collate_fn=_CountingCollate(collate, dataset), **kwargs)
        self._collate = collate
        self._consumed = consumed
        self._position: dict[str, Any] = {"batches": 0, "last_worker": -1, "samples_per_worker": {}}
        self._recent: deque[dict[str, Any]] = deque(maxlen=8)
        self._pass_done = False

    def _layout(self) -> tuple[int, int]:
        datasets = getattr(self.dataset, "_datasets", [self.dataset])
        return datasets[0].distributed_env.world_size, max(self.num_workers, 1)

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        position = self._position
        # Lightning fetches a batch ahead only of a loader without a length (mixed sources), and never past a
        # pass that has ended; a loader with one it stops at its length, without asking for the end.
        consumed = self._consumed() if self._consumed is not None and not self._pass_done else None
        if consumed is not None and consumed < position["batches"] and not _has_length(self):
            earlier = [p for p in self._recent if p["batches"] == consumed]
            if consumed == 0:
                position = {"batches": 0, "last_worker": -1, "samples_per_worker": {}}
            elif earlier:
                position = earlier[0]
            else:
                warnings.warn(
                    f"the training loop took {consumed} batches of this pass and the data loader yielded "
                    f"{position['batches']}: the data position saved is the loader's, ahead of the training",
                    stacklevel=2,
                )
        return dict(state, exact=dict(position, epoch=self.current_epoch))

    @override
    def load_state_dict(self, obj: dict[str, Any]) -> None:
        state = obj["dataset"]
        state = state if "world_size" in state else state["0"]
        saved = (int(state["world_size"]), int(state["num_workers"]))
        if saved != self._layout():
            self._next_pass(obj, saved)
            return
        exact = obj.get("exact")
        if exact is None:
            self._load_litdata_position(obj)
            return
        if exact["batches"] == 0:
            # Nothing of this pass was trained on: start it afresh (LitData counts the pass up on iterating).
            self.current_epoch = int(exact["epoch"]) - 1
            return
        taken = {int(worker): counts for worker, counts in exact["samples_per_worker"].items()}
        workers = range(max(self.num_workers, 1))
        per_source = {w: [int(c) for c in taken.get(w, [0] * len(self._sources()))] for w in workers}
        obj = dict(obj, latest_worker_idx=int(exact["last_worker"]))
        if "world_size" in obj["dataset"]:
            total = sum(counts[0] for counts in per_source.values())
            obj["num_samples_yielded"] = total
            obj["dataset"] = dict(
                obj["dataset"],
                num_samples_yielded=total,
                samples_per_worker={w: counts[0] for w, counts in per_source.items()},
            )
        else:
            obj["num_samples_yielded"] = per_source
            obj["dataset"] = {
                key: dict(
                    part,
                    num_samples_yielded=sum(counts[int(key)] for counts in per_source.values()),
                    samples_per_worker={w: counts[int(key)] for w, counts in per_source.items()},
                )
                for key, part in obj["dataset"].items()
            }
        super().load_state_dict(obj)
        self._position = {
            "batches": int(exact["batches"]),
            "last_worker": int(exact["last_worker"]),
            "samples_per_worker": {w: list(c) for w, c in taken.items()},
        }

    def _sources(self) -> list[Any]:
        return getattr(self.dataset, "_datasets", [self.dataset])

    def _next_pass(self, obj: dict[str, Any], saved: tuple[int, int]) -> None:
        # LitData (0.2.44) replays a pass only on the layout that read it (its _resume has a TODO for elastic
        # sampling; force_override_state_dict repeats and skips blocks). Rather than repeat what this pass
        # already gave, the run goes on with the next pass.
        seen = saved[0] * (
            obj["num_samples_yielded"]
            if "world_size" in obj["dataset"]
            else sum(sum(counts) for counts in obj["num_samples_yielded"].values())
        )
        warnings.warn(
            f"the checkpoint's data position was saved with {saved[0]} ranks x {saved[1]} dataloader "
            f"workers and this run has {self._layout()[0]} x {self._layout()[1]}: LitData cannot re-split a "
            f"partly read pass, so this run starts pass {int(obj['current_epoch']) + 1}; about {seen} blocks "
            f"of pass {obj['current_epoch']} were read and are not repeated, the rest of that pass is skipped",
            stacklevel=3,
        )
        self.current_epoch = int(obj["current_epoch"])

    def _load_litdata_position(self, obj: dict[str, Any]) -> None:
        """A checkpoint from before the exact position was kept: LitData's own, per source for mixed ones."""
        if "world_size" not in obj["dataset"]:
            per_worker = {int(worker): counts for worker, counts in obj["num_samples_yielded"].items()}
            workers = range(max(self.num_workers, 1))
            obj = dict(
                obj,
                dataset={
                    key: dict(
                        state,
                        samples_per_worker={
                            w: int(per_worker[w][int(key)]) if w in per_worker else 0 for w in workers
                        },
                    )
                    for key, state in obj["dataset"].items()
                },
            )
        super().load_state_dict(obj)

    @override
    def _get_iterator(self) -> Any:
        # Called once the epoch counter has moved on and before workers copy the collate function.
        self._collate.epoch = self.current_epoch
        return super()._get_iterator()

    @override
    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._pass_done = False
        if not self.restore:
            self._position = {"batches": 0, "last_worker": -1, "samples_per_worker": {}}
            self._recent.clear()
            if hasattr(self.dataset, "_datasets"):
                # LitData keeps a resumed pass's counts for mixing and would replay them in every later pass.
                self.dataset._num_samples_yielded = None
        for batch in super().__iter__():
            reader = [int(value) for value in batch.pop(READER_KEY)]
            taken = dict(self._position["samples_per_worker"])
            taken[reader[0]] = reader[1:]
            self._position = {
                "batches": self._position["batches"] + 1,
                "last_worker": reader[0],
                "samples_per_worker": taken,
            }
            self._recent.append(self._position)
            # LitData clears its resuming flag only when a pass runs to its end, and Lightning stops taking
            # batches at the loader's length without asking for the end: the next pass would replay this
            # resume. Once the workers have their first requests, the flag has done its work.
            self.restore = False
            yield unpack(batch, self.pin_memory)
        self._pass_done = True
