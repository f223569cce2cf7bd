"""TED against its baselines at small scale, offline on CPU: the docstrings task (6 classes).

The teacher is the real pre-trained MiniLM-L6-H384, fine-tuned here; every student starts as the same two
blocks of the *pre-trained* MiniLM (like the paper's pre-trained DeBERTaV3-xsmall) and trains for the same
number of steps with the same learning rate:
- fine-tuned: the task loss alone;
- KD: task + kl_alpha · T² · KL (T = 2);
- layer-wise KD: KD + mse_alpha · MSE between student block m and teacher block 3m, through a learned
  projection (the paper's layer-wise baseline, TED without filters);
- TED: stage I (filters on teacher blocks 3, 6 and student blocks 1, 2, models frozen, one epoch), then
  KD + mse_alpha · MSE through the filters.

    python benchmarks/ted_comparison.py            # about 4-5 minutes on 2 cores
    python benchmarks/ted_comparison.py --seeds 0 1 2

Prints validation accuracy per method (and per seed), then the mean.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import tempfile
import time
import warnings
from typing import Any

import lightning as L
import torch
from transformers import AutoModelForSequenceClassification

from lightning_kd import DistillationModule, FineTuningModule, GLUEDataModule, build_student
from lightning_kd.finetuning.module import sequence_logits
from lightning_kd.hub import load_model
from lightning_kd.ted.callback import TEDFilterCallback

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
METHODS = ("fine-tuned", "KD", "layer-wise KD", "TED")


ACCELERATOR = "cpu"  # fidelity.py --accelerator gpu sets it


def trainer(epochs: int, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator=ACCELERATOR,
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **kwargs,
    )


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: GLUEDataModule) -> float:
    model.eval()
    device = next(model.parameters()).device  # where its fit left it
    right = total = 0
    for batch in data.val_dataloader():
        batch = {key: value.to(device) for key, value in batch.items()}
        right += int((sequence_logits(model, batch).argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    return right / total


def pretrained() -> torch.nn.Module:
    return load_model(MODEL, AutoModelForSequenceClassification, num_labels=6)


def run(seed: int, args: argparse.Namespace, data: GLUEDataModule) -> dict[str, float]:
    L.seed_everything(seed, verbose=False)
    tuning = FineTuningModule(pretrained(), "docstrings", learning_rate=args.teacher_lr, warmup_ratio=0.1)
    trainer(args.teacher_epochs).fit(tuning, data)
    teacher = tuning.model.eval()
    scores = {"teacher": accuracy(teacher, data)}
    # its 3rd and 6th blocks (the uniform choice) of the pre-trained, not the fine-tuned, MiniLM
    student = build_student({"init": "layers", "num_layers": 2}, pretrained())
    kd = [{"term": "task"}, {"term": "logits", "temperature": 2.0, "weight": args.kl_alpha}]
    layerwise = {"term": "hidden", "layers": [[1, 3], [2, 6]], "projection": True, "weight": args.mse_alpha}

    def distill(
        objective: list[dict[str, Any]],
        callbacks: list[L.Callback] = (),
        lr: float | None = None,
        epochs: int | None = None,
    ) -> DistillationModule:
        L.seed_everything(seed, verbose=False)
        module = DistillationModule(
            teacher,
            copy.deepcopy(student),
            objective=objective,
            task="sequence-classification",
            learning_rate=lr or args.lr,
            warmup_steps=0.1,
        )
        trainer(epochs or args.epochs, callbacks=list(callbacks)).fit(module, data)
        return module

    scores["fine-tuned"] = accuracy(distill([{"term": "task"}]).student, data)
    scores["KD"] = accuracy(distill(kd).student, data)
    scores["layer-wise KD"] = accuracy(distill([*kd, layerwise]).student, data)
    with tempfile.TemporaryDirectory() as filters:
        options = {"interval": 3, "save_dir": filters}
        distill(
            [{"term": "task"}], [TEDFilterCallback(stage="filters", **options)], lr=args.filter_lr, epochs=1
        )
        stage_two = TEDFilterCallback(stage="distill", filters=filters, interval=3, weight=args.mse_alpha)
        scores["TED"] = accuracy(distill(kd, [stage_two]).student, data)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=2, help="student epochs (761 examples, batch 16)")
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--teacher-lr", type=float, default=1e-4)
    parser.add_argument("--filter-lr", type=float, default=1e-3)
    parser.add_argument("--kl-alpha", type=float, default=1.0)
    parser.add_argument("--mse-alpha", type=float, default=1.0)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning_kd").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    data = GLUEDataModule("docstrings", MODEL, max_length=args.max_length, batch_size=16, eval_batch_size=64)
    data.setup("fit")
    start = time.perf_counter()
    results = []
    for seed in args.seeds:
        scores = run(seed, args, data)
        results.append(scores)
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)
    print(f"\nvalidation accuracy, mean over {len(results)} seed(s), {time.perf_counter() - start:.0f} s:")
    for name in ("teacher", *METHODS):
        print(f"  {name:14s} {sum(r[name] for r in results) / len(results):.3f}")


if __name__ == "__main__":
    main()
