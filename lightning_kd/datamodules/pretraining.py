"""Packed text for distillation pre-training, masked (MLM) or not (causal LM): from prepared LitData shards, or
streamed from text.

Prepared shards (``prepared=``) are read by LitData (see :mod:`.prepared`); without them the text streams
from its sources (see :mod:`.stream`). Either way the stream resumes from a checkpoint where it stopped.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

from lightning_kd.checks import check_number
from lightning_kd.datamodules.causal import LM, check_lm, end_of_text
from lightning_kd.datamodules.common import (
    check_vocabulary,
    distributed_position,
    get_tokenizer,
    pin_memory_default,
    vocabulary_hash,
)
from lightning_kd.datamodules.sources import (
    DEFAULT_HUB_SOURCES,
    DataSourceError,
    SourceSpec,
    parse_source,
    read_documents,
)
from lightning_kd.datamodules.stream import (
    POSITION_KEY,
    PackedMLMStream,
    PositionTracker,
    PositionTrackingLoader,
    check_every_reader_reads,
    evaluation_batch,
    first_reader,
)
from lightning_kd.training.run_checks import check_run_ends

__all__ = ["POSITION_KEY", "PackedMLMStream", "PretrainingDataModule"]


class PretrainingDataModule(L.LightningDataModule):
    """Packed blocks from a prepared folder (LitData shards) or streamed from text, resumable from checkpoints.

    Args:
        lm: ``"mlm"``: ``[CLS] ... [SEP]`` blocks masked for a masked LM (BERT-like), batches with ``input_ids``,
            ``attention_mask``, ``token_type_ids``, ``labels`` (-100 where not masked) and
            ``prediction_positions``. ``"causal"``: documents joined by the tokenizer's end-of-text token, not
            masked, for decoder LMs (Llama, Qwen, Mistral); batches with ``input_ids``, ``attention_mask`` and
            ``labels`` (the input ids, -100 at padding; the model shifts them). A prepared folder must have been
            prepared with the same ``lm``.
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
        mlm_probability, whole_word_masking: MLM masking; not used with ``lm="causal"``.
        val_sources: held-out text to validate on, given as ``sources`` are (``[{name: docstrings, split:
            validation}]``: the docstrings ``split: train`` leaves out). Read whole at every validation, in the
            training blocks' layout (MLM masks from ``seed``, the same at every validation), by every rank alike,
            so every rank logs the same values; a causal LM (DistillationModule, FineTuningModule) logs its
            perplexity there. ``None``: no validation.
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
        lm: LM = "mlm",
        val_sources: list[str | dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        # A batch size of 0 would spin forever without yielding a batch.
        for name, value, low in (
            ("max_length", max_length, 1),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("seed", seed, 0),
        ):
            check_number(name, value, low=low, integer=True)
        for name, given in (("sources", sources), ("val_sources", val_sources)):
            if isinstance(given, (str, dict)):
                raise ValueError(f"{name} must be a list, e.g. {name}: [{given!r}] (a lone name was given).")
        check_number("mlm_probability", mlm_probability, low=0, high=1, low_open=True, high_open=True)
        check_lm(lm)
        if lm == "causal" and whole_word_masking:
            raise ValueError("whole_word_masking is MLM masking, and lm='causal' masks nothing: remove it")
        self.lm = lm
        self.prepared = str(prepared) if prepared is not None else None
        self.shuffle = shuffle
        self.manifest: dict[str, Any] | None = None
        if self.prepared is not None:
            self.manifest = self._read_prepared(self.prepared, tokenizer, max_length, sources, lm)
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
        self.max_length = max_length
        self.batch_size = batch_size
        self.mlm_probability = mlm_probability
        self.whole_word_masking = whole_word_masking
        self.num_workers = num_workers
        self.seed = seed
        self.repeat = repeat
        self.cache_dir = cache_dir
        self.pin_memory = pin_memory
        self.val_sources = list(val_sources) if val_sources else []
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._specs: list[SourceSpec] | None = None
        self._dataset: PackedMLMStream | None = None
        self._tracker = PositionTracker()
        self._resume: dict[int, dict[str, Any]] = {}
        self._resume_next: list[int] = []  # per rank, the reader whose turn was next

    @staticmethod
    def _read_prepared(
        folder: str, tokenizer: Any, max_length: int, sources: list[str | dict[str, Any]] | None, lm: str
    ) -> dict[str, Any]:
        from lightning_kd.datamodules.prepare import PreparedDataError, manifest_lm, read_manifest

        manifest = read_manifest(folder)
        if manifest_lm(manifest) != lm:
            kinds = {"mlm": "[CLS] ... [SEP] blocks for masked LMs", "causal": "causal-LM blocks"}
            raise PreparedDataError(
                f"{folder} holds {kinds[manifest_lm(manifest)]} (lm: {manifest_lm(manifest)}), not {kinds[lm]} "
                f"(lm: {lm}): set lm: {manifest_lm(manifest)}, or prepare the corpus again for this model into "
                f"another folder: `lightning-kd prepare --lm {lm} --output NEW_FOLDER --tokenizer "
                f"{manifest['tokenizer']} --max_length {manifest['max_length']} --sources ...`"
            )
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

    @property
    def val_specs(self) -> list[SourceSpec]:
        return [parse_source(source, self.cache_dir) for source in self.val_sources]

    @override
    def prepare_data(self) -> None:
        """Collect the docstrings corpus once, on one process per node."""
        from lightning_kd.datamodules.docstrings import docstrings_path

        for spec in (self.specs if self.prepared is None else []) + self.val_specs:
            if spec.kind == "docstrings":
                docstrings_path(spec.packages, spec.cache_dir, split=spec.split)

    @override
    def setup(self, stage: str | None = None) -> None:
        from lightning_kd.datamodules.sources import load_hub_dataset

        for spec in (self.specs if self.prepared is None else []) + self.val_specs:
            if spec.kind == "hub":
                # Resolving the stream here makes an offline run fail now, with the way out, not in a worker.
                load_hub_dataset(spec.name, spec.config, spec.split, streaming=True)
        if self.lm == "causal":
            end_of_text(self.tokenizer)  # now, not in a dataloader worker
        trainer = self._trainer_or_none()
        if trainer is not None:
            check_vocabulary(self.tokenizer, trainer.lightning_module)
            if stage == "fit":
                check_run_ends(trainer, endless=self.prepared is None and self.repeat)

    def _trainer_or_none(self) -> Any:
        return getattr(self, "trainer", None)

    def check_not_empty(self, specs: list[SourceSpec] | None = None) -> None:
        """Fail now when a source (of ``specs``, by default the training sources) holds no document at all.

        Without this, ``repeat=False`` makes an empty epoch, and a Trainer with ``max_steps`` starts empty
        epochs forever at step 0; an empty validation source would validate on nothing, silently.
        """
        for spec in self.specs if specs is None else specs:
            if next(read_documents(spec, 0, 1), None) is None:
                where = ", ".join(spec.files) if spec.files else spec.name
                raise DataSourceError(
                    f"the source {spec.name!r} holds no documents (every line or record is empty: {where}); "
                    "remove it from sources or fill it"
                )

    def prepared_loader(self, rank: int = 0, world_size: int = 1, num_nodes: int = 1) -> DataLoader:
        """LitData's loader over the prepared folder, for the reader at ``rank`` of ``world_size``."""
        from lightning_kd.datamodules.causal import CausalCollate
        from lightning_kd.datamodules.prepared import MaskingCollate, PreparedLoader, prepared_datasets

        assert self.prepared is not None and self.manifest is not None
        dataset = prepared_datasets(
            self.prepared, self.manifest, self.shares, self.shuffle, self.seed, rank, world_size, num_nodes
        )
        collate = (
            CausalCollate(self.tokenizer)
            if self.lm == "causal"
            else MaskingCollate(self.tokenizer, self.mlm_probability, self.whole_word_masking, self.seed)
        )
        return PreparedLoader(
            dataset,
            collate,
            consumed=self._batches_in_pass,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self._pin_memory(),
        )

    def _pin_memory(self) -> bool:
        return pin_memory_default(self._trainer_or_none()) if self.pin_memory is None else self.pin_memory

    @override
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
            self.lm,
        )
        dataset.rank, dataset.world_size = distributed_position(self._trainer_or_none())
        # Only this rank's readers: the positions of every rank are gathered into one checkpoint.
        workers = max(self.num_workers, 1)
        mine = range(dataset.rank * workers, (dataset.rank + 1) * workers)
        # every reader, on every rank: a rank that failed alone would leave the others waiting
        if self.repeat:
            check_every_reader_reads(self.specs, self.probabilities, dataset.world_size * workers)
        dataset.start_positions = {k: v for k, v in self._resume.items() if k in mine}
        dataset.first_reader = first_reader(
            self._resume_next, mine, dataset.start_positions, dataset.world_size
        )
        self._tracker.positions = dict(dataset.start_positions)
        self._dataset = dataset
        return PositionTrackingLoader(
            dataset,
            self,
            num_workers=self.num_workers,
            pin_memory=self._pin_memory(),
            persistent_workers=False,
        )

    @override
    def val_dataloader(self) -> DataLoader | list:
        """The ``val_sources`` once through, every rank all of it; none without them (Lightning then skips
        validation)."""
        if not self.val_specs:
            return []
        self.check_not_empty(self.val_specs)
        dataset = PackedMLMStream(
            self.val_specs,
            [1.0 / len(self.val_specs)] * len(self.val_specs),  # not repeated: every document is read once
            self.tokenizer,
            self.max_length,
            self.batch_size,
            self.mlm_probability,
            self.whole_word_masking,
            self.seed,
            False,
            self.lm,
        )
        return DataLoader(
            dataset, batch_size=None, collate_fn=evaluation_batch, pin_memory=self._pin_memory()
        )

    def _batches_taken(self) -> int | None:
        """How many batches the training loop has taken so far, when a trainer drives the loader."""
        trainer = self._trainer_or_none()
        if trainer is None:
            return None
        return trainer.fit_loop.epoch_loop.batch_progress.total.ready

    def _batches_in_pass(self) -> int | None:
        """How many batches of this pass the training loop has taken (a prefetcher may have fetched more)."""
        trainer = self._trainer_or_none()
        return None if trainer is None else trainer.fit_loop.epoch_loop.batch_progress.current.ready

    @override
    def state_dict(self) -> dict[str, Any]:
        """The stream position of every reader on every rank (gathered, so rank 0's checkpoint has them all).

        Prepared data keeps its position in LitData's loader, whose ``state_dict`` Lightning stores itself.
        """
        if self.prepared is not None:
            return {}
        positions, next_reader = self._tracker.consumed(self._batches_taken())
        turns = [] if next_reader is None else [next_reader]
        if next_reader is None and positions:  # restored and not read since: the restored turn stands
            rank, workers = distributed_position(self._trainer_or_none())[0], max(self.num_workers, 1)
            turns = [r for r in self._resume_next if rank * workers <= r < (rank + 1) * workers]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (positions, turns))
            positions = {k: v for rank_positions, _ in gathered for k, v in rank_positions.items()}
            turns = [reader for _, rank_turns in gathered for reader in rank_turns]
        if not positions:
            return {}
        return {
            "sources": [spec.name for spec in self.specs],
            "positions": {str(k): v for k, v in positions.items()},
            "next_readers": sorted(turns),
        }

    @override
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
        # Older checkpoints do not say whose turn was next: their runs resume at worker 0, as they did.
        self._resume_next = [int(reader) for reader in state_dict.get("next_readers", [])]
        self._tracker = PositionTracker()
        self._tracker.positions = dict(self._resume)
