"""What each part of DistillationModule's training step costs beyond the math, measured inside one run.

Wraps, for the duration of a run, the pieces the module and its default callbacks add around the models and the
losses, and sums the wall time spent in each, per step:

- ``logging``: ``self.log`` / ``self.log_dict`` (Lightning's result collection), in the step and the hooks;
- ``guard: check``: NonFiniteGuard's check before each update; ``guard: other hooks``: keeping the loss and
  terms, and the reads on logging steps;
- ``time accounting``: StepTimer's clock marks, token counting and summaries;
- ``dropout stream``: entering and leaving the student's own random stream;
- ``prepare_batch``: completing the batch (attention mask, prediction positions);
- ``lightning loop, rest``: what the step costs beyond the parts above and the forward, backward and optimizer
  sections that StepTimer splits out (``math``): Lightning's hook dispatch, closure and progress.

It prints ms per step for each, and its share of the median step. The same shape and objective as
``step_overhead.py`` (masked-position KD, MiniLM-L6-H384 shape into 3 layers, batch 8 x 128).

    python benchmarks/step_parts.py [--steps 12] [--batch 8] [--seq 128] [--log-every 50] [--tiny] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from step_overhead import MLM_OBJECTIVE, mlm_batches, mlm_teacher_model
from transformers import BertConfig, BertForMaskedLM

from lightning_kd import DistillationModule
from lightning_kd.callbacks.nonfinite import NonFiniteGuard
from lightning_kd.training.timing import StepTimer

SPENT: dict[str, float] = defaultdict(float)
_depth = {"n": 0}


def timed_method(owner: type, name: str, part: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _depth["n"]:  # inside another timed part: counted there
            return original(*args, **kwargs)
        _depth["n"] += 1
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            SPENT[part] += time.perf_counter() - start
            _depth["n"] -= 1

    setattr(owner, name, wrapper)


def timed_context(owner: type, name: str, part: str) -> None:
    original: Callable[..., Any] = getattr(owner, name)

    @contextmanager
    def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
        start = time.perf_counter()
        context = original(*args, **kwargs)
        value = context.__enter__()
        SPENT[part] += time.perf_counter() - start
        try:
            yield value
        finally:
            start = time.perf_counter()
            context.__exit__(None, None, None)
            SPENT[part] += time.perf_counter() - start

    setattr(owner, name, wrapper)


class Steps(L.Callback):
    """Wall time of each step and the parts spent in it (first: around every other callback)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_start(self, *args: Any) -> None:
        SPENT.clear()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, *args: Any) -> None:
        row = {k: v * 1e3 for k, v in SPENT.items()}
        row["step"] = (time.perf_counter() - self.start) * 1e3
        self.rows.append(row)


class Sections(L.Callback):
    """Forward, backward and optimizer wall time, read from the module's StepTimer spans before it sums them."""

    def __init__(self, steps: Steps) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, *args: Any) -> None:
        timer = module.step_timer
        spans = [s for s in timer._spans if s[1] is None]  # top-level sections
        self.steps.rows[-1]["math"] = sum(timer.clock.elapsed_ms(b, e) for _, _, b, e in spans)
        timer._spans = []


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument(
        "--tiny", action="store_true", help="a 2-layer, 64-wide BERT (vocabulary 2,000): the fixed costs show"
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    timed_method(L.LightningModule, "log", "logging")
    timed_method(L.LightningModule, "log_dict", "logging")
    timed_method(NonFiniteGuard, "on_before_optimizer_step", "guard: check")
    for hook in ("on_before_backward", "on_train_batch_end", "on_train_end"):
        timed_method(NonFiniteGuard, hook, "guard: other hooks")
    for method in ("start", "stop", "count", "end_step", "summary"):
        timed_method(StepTimer, method, "time accounting")
    timed_context(DistillationModule, "_dropout_stream", "dropout stream")
    timed_method(DistillationModule, "prepare_batch", "prepare_batch")

    torch.manual_seed(0)
    teacher = (
        BertForMaskedLM(
            BertConfig(vocab_size=2000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2)
        )
        if args.tiny
        else mlm_teacher_model()
    )
    module = DistillationModule(
        teacher,
        {"init": "layers", "num_layers": 1 if args.tiny else 3},
        objective=MLM_OBJECTIVE,
        task="masked-lm",
        schedule="constant",
    )
    data = mlm_batches(4, args.batch, args.seq, teacher.config.vocab_size)
    steps = Steps()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[steps, Sections(steps)],
        log_every_n_steps=args.log_every,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    rows = steps.rows[1:]  # the first step builds the optimizer state
    step = statistics.median(r["step"] for r in rows)
    print(f"{len(rows)} steps, batch {args.batch}x{args.seq}, {torch.get_num_threads()} threads")
    print(f"{'part':22s} {'ms/step':>9s} {'share':>7s}")
    # the check runs inside the optimizer section, the dropout stream inside the student's forward
    inside = ["guard: check", "dropout stream"]
    outside = ["logging", "guard: other hooks", "time accounting", "prepare_batch"]

    def show(name: str, values: list[float]) -> None:
        value = statistics.median(values)
        print(f"{name:22s} {value:9.2f} {value / step:7.2%}")

    show("step", [r["step"] for r in rows])
    show("math (sections)", [r.get("math", 0.0) - sum(r.get(p, 0.0) for p in inside) for r in rows])
    for part in [*inside, *outside]:
        show(part, [r.get(part, 0.0) for r in rows])
    show("lightning loop, rest", [r["step"] - r["math"] - sum(r.get(p, 0.0) for p in outside) for r in rows])


if __name__ == "__main__":
    main()
