"""Reading prepared folders back: LitData datasets over the shards, masking at collate time, a resumable loader.

Causal-LM folders (``lm: causal``) are read by the same datasets and loader with
:class:`~lightning_kd.datamodules.causal.CausalCollate` in place of :class:`MaskingCollate`.

The folders are written by :func:`~lightning_kd.datamodules.prepare.prepare` (``lightning-kd prepare``), whose
module describes their layout and the manifest.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset, TokensLoader
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_kd.batch import with_prediction_positions
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
        # One tensor crosses from a worker to the main process instead of four (one shared-memory segment
        # each); the loader unpacks it into views.
        return with_prediction_positions({PACKED_KEY: torch.stack([masked, attention_mask, labels])}, labels)


class OwnedBlocksDataset(StreamingDataset):
    """LitData's StreamingDataset, but each block is a copy: its TokensLoader returns views into a chunk's memory
    map and unmaps the chunk once read, while a batch being collated still holds blocks from it (a segfault)."""

    def __next__(self) -> Any:
        block = super().__next__()
        return block.clone() if isinstance(block, torch.Tensor) else np.array(block)

    @override
    def _resume(self, workers_chunks: list[list[int]], workers_intervals: list[Any]) -> None:
        # LitData 0.2.44 works out how far each worker read from the total, as if every batch came whole
        # from one dataset; mixed with weights, a batch takes some blocks from each source. PreparedLoader
        # hands each dataset its exact count per worker, which LitData's replay then uses.
        exact = (self._state_dict or {}).get("samples_per_worker")
        if exact is None:
            super()._resume(workers_chunks, workers_intervals)
            return
        import litdata.streaming.dataset as litdata_dataset

        replay = litdata_dataset._replay_sampling
        litdata_dataset._replay_sampling = lambda *_: {int(worker): count for worker, count in exact.items()}
        try:
            super()._resume(workers_chunks, workers_intervals)
        finally:
            litdata_dataset._replay_sampling = replay


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


class PreparedLoader(StreamingDataLoader):
    """LitData's loader, telling the masking collate function which epoch it is in.

    Its ``state_dict`` / ``load_state_dict`` are LitData's: Lightning stores a resumable loader's state in
    the checkpoint (``loops.fit_loop.state_dict.combined_loader``) and restores it on resume.
    """

    def __init__(self, dataset: Any, collate: Any, **kwargs: Any) -> None:
        super().__init__(dataset, collate_fn=collate, **kwargs)
        self._collate = collate

    def _layout(self) -> tuple[int, int]:
        datasets = getattr(self.dataset, "_datasets", [self.dataset])
        return datasets[0].distributed_env.world_size, max(self.num_workers, 1)

    @override
    def load_state_dict(self, obj: dict[str, Any]) -> None:
        state = obj["dataset"]
        state = state if "world_size" in state else state["0"]
        saved = (int(state["world_size"]), int(state["num_workers"]))
        if saved != self._layout():
            # LitData (0.2.44) replays a pass only on the layout that read it (its _resume has a TODO for
            # elastic sampling; force_override_state_dict repeats and skips blocks). Rather than repeat what
            # this pass already gave, the run goes on with the next pass.
            seen = saved[0] * (
                state["num_samples_yielded"]
                if "world_size" in obj["dataset"]
                else sum(sum(counts) for counts in obj["num_samples_yielded"].values())
            )
            warnings.warn(
                f"the checkpoint's data position was saved with {saved[0]} ranks x {saved[1]} dataloader "
                f"workers and this run has {self._layout()[0]} x {self._layout()[1]}: LitData cannot re-split a "
                f"partly read pass, so this run starts pass {int(obj['current_epoch']) + 1}; about {seen} blocks "
                f"of pass {obj['current_epoch']} were read and are not repeated, the rest of that pass is skipped",
                stacklevel=2,
            )
            self.current_epoch = int(obj["current_epoch"])
            return
        if "world_size" not in obj["dataset"]:
            # Mixed sources: what each worker took from each source, for OwnedBlocksDataset._resume.
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
        for batch in super().__iter__():
            yield unpack(batch)
