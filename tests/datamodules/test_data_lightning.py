"""PretrainingDataModule under a Trainer (max_steps, checkpoint, resume) and under two DDP ranks."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers_data import data_trainer
from kd_datafiles import TOKENIZER, write_lines
from torch import nn

from lightning_kd.datamodules import PretrainingDataModule


class Student(L.LightningModule):
    """A tiny student whose final weights depend on every batch it trains on, and on their order (momentum)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            # Token ids folded onto a prime: a full vocabulary's embedding makes each step 10x slower.
            self.embed = nn.Embedding(251, 4)
            self.head = nn.Linear(4, 1)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append(torch.stack([batch["input_ids"], batch["labels"]]).clone())
        chosen = (batch["labels"] != -100).float()
        return (self.head(self.embed(batch["input_ids"] % 251)).squeeze(-1) * chosen).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


class StopAt(L.Callback):
    """Saves a checkpoint after ``step`` optimizer steps and stops there, mid-epoch (as a preemption would)."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


@pytest.fixture(scope="module")
def shared_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "corpus.txt"
    write_lines(path, 150)
    return path


def stream(corpus: Path, num_workers: int, **kwargs: object) -> PretrainingDataModule:
    settings = dict(max_length=32, batch_size=4, num_workers=num_workers, whole_word_masking=True)
    return PretrainingDataModule(TOKENIZER, [str(corpus)], **{**settings, **kwargs})


def stop_and_resume(
    root: Path,
    data: Callable[[], PretrainingDataModule],
    stops: tuple[int, ...],
    straight: Student,
    **limits: object,
) -> None:
    """Stops after each of ``stops`` steps, resuming each time from the last stop: the batches of the
    ``straight`` run, in its order, and its final student, exactly."""
    runs: list[Student] = []
    saved = None
    for stop in (*stops, None):
        run = Student()
        callbacks = [] if stop is None else [StopAt(stop, root / f"stopped-{stop}.ckpt")]
        data_trainer(root / f"run-{stop}", enable_checkpointing=False, callbacks=callbacks, **limits).fit(
            run, datamodule=data(), ckpt_path=saved
        )
        runs.append(run)
        saved = None if stop is None else root / f"stopped-{stop}.ckpt"
    assert [len(run.seen) for run in runs[:-1]] == [b - a for a, b in zip((0, *stops), stops, strict=False)]
    resumed = [batch for run in runs for batch in run.seen]
    assert len(resumed) == len(straight.seen)
    for k, (seen, expected) in enumerate(zip(resumed, straight.seen, strict=True)):
        assert torch.equal(seen, expected), f"batch {k} differs from the uninterrupted run's"
    for (name, mine), theirs in zip(
        runs[-1].state_dict().items(), straight.state_dict().values(), strict=True
    ):
        assert torch.equal(mine, theirs), f"{name} differs from the uninterrupted run's"


def straight_run(root: Path, data: Callable[[], PretrainingDataModule], **limits: object) -> Student:
    student = Student()
    data_trainer(root / "a", enable_checkpointing=False, **limits).fit(student, datamodule=data())
    return student


@pytest.mark.parametrize("num_workers", [0, 1, 2, 4])
def test_resumed_fit_sees_exactly_the_batches_of_a_run_that_never_stopped(
    tmp_path, shared_corpus, num_workers
):
    # Stopping after 3 steps leaves the next batch to worker 3 % num_workers, not to worker 0, where a new
    # DataLoader starts its turns; stopping again after 6, from a resumed run, checks the position it counts.
    data = functools.partial(stream, shared_corpus, num_workers)
    stop_and_resume(tmp_path, data, (3, 6), straight_run(tmp_path, data, max_steps=8), max_steps=8)


def test_resume_across_an_epoch_boundary(tmp_path):
    # One pass per epoch (repeat=False): a checkpoint at the last batch of an epoch, or just after it, resumes
    # with the next pass from the top (it once resumed at the end of the finished pass, and lost an epoch).
    corpus = tmp_path / "small.txt"
    write_lines(corpus, 40)
    data = functools.partial(stream, corpus, 2, repeat=False)
    limits = dict(max_steps=-1, max_epochs=2)
    straight = straight_run(tmp_path, data, **limits)
    per_epoch = len(straight.seen) // 2
    for stop in (per_epoch, per_epoch + 1):
        stop_and_resume(tmp_path / str(stop), data, (stop,), straight, **limits)


def _rank_main(rank: int, folder: str, corpus: str) -> None:
    # forked from a process whose OpenMP threads may be running: with one thread no parallel region starts here
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["KD_TEST_PORT"])
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        dm = PretrainingDataModule(TOKENIZER, [corpus], max_length=32, batch_size=4, repeat=False)
        dm.train_dataloader()
        batches = list(torch.utils.data.DataLoader(dm._dataset, batch_size=None))
        from helpers_data import documents_by_reader

        docs = documents_by_reader(batches, dm.tokenizer)
        loader = dm.train_dataloader()
        for _ in zip(range(2), loader, strict=False):
            pass
        state = dm.state_dict()  # a collective: every rank's positions end up in every rank's copy
        Path(folder, f"rank{rank}.json").write_text(json.dumps({"docs": docs, "state": state}))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ddp_ranks_see_every_document_once(tmp_path, tokenizer):
    import socket

    from helpers_data import normalised

    corpus = tmp_path / "corpus.txt"
    lines = write_lines(corpus, 90)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        os.environ["KD_TEST_PORT"] = str(probe.getsockname()[1])
    # forked, not spawned: a spawned rank re-imports torch, Lightning and transformers before its first line
    torch.multiprocessing.start_processes(
        _rank_main, args=(str(tmp_path), str(corpus)), nprocs=2, join=True, start_method="fork"
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    docs = results[0]["docs"]["0"] + results[1]["docs"]["1"]
    assert sorted(docs) == sorted(normalised(lines, tokenizer)), "a document was skipped or read twice"
    assert not set(results[0]["docs"]["0"]) & set(results[1]["docs"]["1"])
    for result in results:
        assert sorted(result["state"]["positions"]) == ["0", "1"]
        assert result["state"]["next_readers"] == [0, 1]  # each rank's one reader, its own next
