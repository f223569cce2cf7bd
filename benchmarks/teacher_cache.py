"""Epoch time of task-specific distillation with the teacher's outputs cached, against without, offline on CPU.

The recipe of `experiments/ted/tiny_stage2.yaml` without the filters: the real MiniLM-L6-H384 (6 blocks, as a
6-class classifier) teaches two of its own blocks on the docstrings task, with the task loss and the logits KL.
The cache keeps the logits only (the objective reads nothing else). Each run trains two epochs on the same
batches; the second epoch is timed: uncached it runs the teacher again, cached it reads every output from the
cache filled in the first. Runs alternate, uncached first, so a machine busy with other work slows both alike.
The uncached runs also report the teacher's share of the step (``time/teacher_forward`` over ``time/step``,
logged once per epoch as the epoch's mean): the saving can approach it but not pass it. Logging once per epoch
also keeps the discrepancy metrics, which need the teacher's hidden states and so run it even when cached, to
one step of each epoch.

    python benchmarks/teacher_cache.py            # about 2 minutes on 2 cores
    python benchmarks/teacher_cache.py --rounds 3 --batches 24
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings
from typing import Any

import lightning as L
import torch
from transformers import AutoModelForSequenceClassification

from lightning_kd import DistillationModule, GLUEDataModule
from lightning_kd.hub import load_model

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class EpochClock(L.Callback):
    """Wall time of each training epoch, and the StepTimer's teacher and step times logged in it."""

    def __init__(self) -> None:
        self.epochs: list[float] = []
        self.teacher_ms: list[float] = []
        self.step_ms: list[float] = []
        self.hit_rate: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self.teacher_ms, self.step_ms = [], []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        metrics = trainer.callback_metrics
        if "time/teacher_forward_ms" in metrics:
            self.teacher_ms.append(float(metrics["time/teacher_forward_ms"]))
            self.step_ms.append(float(metrics["time/step_ms"]))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epochs.append(time.perf_counter() - self._start)
        if pl_module.teacher_cache is not None:  # before the module's own hook reads and resets the counts
            cache = pl_module.teacher_cache
            self.hit_rate.append(cache.hits / max(cache.hits + cache.misses, 1))


def run(teacher: Any, data: GLUEDataModule, batches: int, cached: bool) -> tuple[float, float, float]:
    torch.manual_seed(0)
    module = DistillationModule(
        teacher,
        {"init": "layers", "num_layers": 2},
        task="sequence-classification",
        objective=[{"term": "task"}, {"term": "logits", "temperature": 2.0}],
        learning_rate=2e-4,
        teacher_cache="memory" if cached else None,
    )
    clock = EpochClock()
    L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=batches,
        callbacks=[clock],
    ).fit(module, data)
    share = sum(clock.teacher_ms) / max(sum(clock.step_ms), 1e-9)
    hits = float(clock.hit_rate[-1]) if clock.hit_rate else 0.0
    return clock.epochs[1], share, hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batches", type=int, default=12, help="training batches per epoch (of 16 examples)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    teacher = load_model(MODEL, AutoModelForSequenceClassification, num_labels=6).eval()
    data = GLUEDataModule("docstrings", MODEL, max_length=64, batch_size=16, seed=0)
    data.setup("fit")
    # a fixed subset, whole epochs of it: every epoch reshuffles the same examples (limit_train_batches would
    # draw other examples each epoch, which no cache has seen)
    data.datasets["train"] = data.datasets["train"][: args.batches * 16]
    plain, cached, shares = [], [], []
    for _ in range(args.rounds):
        seconds, share, _ = run(teacher, data, args.batches, cached=False)
        plain.append(seconds)
        shares.append(share)
        seconds, _, hits = run(teacher, data, args.batches, cached=True)
        cached.append(seconds)
    print(
        f"threads: {torch.get_num_threads()}, {args.batches} batches of 16 x <=64 tokens per epoch, "
        f"{args.rounds} rounds alternating"
    )
    print(f"second epoch, uncached: {', '.join(f'{s:.2f}' for s in plain)} s")
    print(f"second epoch, cached:   {', '.join(f'{s:.2f}' for s in cached)} s")
    ratio = min(cached) / min(plain)
    share = sum(shares) / len(shares)
    print(
        f"epoch time cached / uncached (fastest of each): {ratio:.3f}  (saving {1 - ratio:.1%}); "
        f"teacher forward share of the uncached step: {share:.1%}; cache hit rate in the second epoch: "
        f"{hits:.0%}"
    )


if __name__ == "__main__":
    main()
