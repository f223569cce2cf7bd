"""Per-rank memory of a HomoDistil run on DDP against FSDP2 (teacher sharded, and teacher replicated), on CPU.

The same run in every mode: a BERT masked-LM teacher of ``--hidden``/``--layers``/``--vocab``, its copy as the
student, AdamW, and a PruningCallback halving heads, FFN and hidden over ``--steps`` steps (events every
``--interval``), on ``--ranks`` CPU processes (gloo). Each mode runs in a fresh set of processes, so no mode
inherits another's heap. Every rank reports:

- model+optimizer: the bytes of the tensors this rank holds for the student's weights, its AdamW moments and the
  teacher's weights (its shards under FSDP2), counted exactly from the tensors, at the start and after every
  event. On N ranks FSDP2 should hold about 1/N of DDP's (the student and its moments always; the teacher too
  when sharded).
- peak RSS: the kernel's high-water mark of the process's resident memory (``VmHWM``), reset at the start and at
  every event by writing 5 to ``/proc/self/clear_refs``, so each window between events has its own peak; shown
  above the resident memory of the bare process (Python, torch and the libraries: several hundred MiB before
  any model exists, measured before the models are built). It includes activations, gathered blocks and the
  allocator's slack: an event's window also holds the student gathered whole while it is cut. "n/a" where
  the kernel refuses the reset. Freed memory only lowers the resident set when the allocator gives it back, so
  the processes run with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then maps every block over 64 KiB on its own
  and unmaps it when freed); otherwise the heap keeps what an event freed and every later window reads the
  earlier peak. Compare modes of one invocation: a busy machine changes the allocator's habits.

The table gives, per mode and rank, both figures at the start, the share left after each event (relative to
the start), and FSDP2's figure as a share of DDP's.

    python benchmarks/fsdp_memory.py                           # a few minutes on an idle machine
    python benchmarks/fsdp_memory.py --hidden 128 --layers 2 --vocab 2000 --steps 4 --interval 2   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _memory import reset_peak_rss, status_kib

MIB = 2**20
MODES = ("ddp", "fsdp2", "fsdp2-replicated")


def run_rank(args: argparse.Namespace) -> None:
    """One mode on ``args.ranks`` processes (Lightning starts the others by running this script again)."""
    import lightning as L
    import torch
    from torch.distributed.tensor import DTensor
    from torch.utils.data import DataLoader
    from transformers import BertConfig, BertForMaskedLM

    from lightning_kd import DistillationModule, PruningCallback
    from lightning_kd.training.sharding import fsdp2

    def local_bytes(tensors: object) -> int:
        total = 0
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.dim() > 0:
                local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
                total += local.numel() * local.element_size()
        return total

    def held(module: DistillationModule, trainer: L.Trainer) -> int:
        state = [v for optimizer in trainer.optimizers for s in optimizer.state.values() for v in s.values()]
        params = list(module.student.parameters()) + list(module.teacher.parameters())
        return local_bytes(params) + local_bytes(state)

    class Probe(L.Callback):
        def __init__(self, pruning: PruningCallback) -> None:
            self.pruning, self.rows, self.resettable = pruning, [], False

        def _row(self, trainer: L.Trainer, module: DistillationModule, label: str) -> None:
            peak = status_kib("VmHWM") * 1024 if self.resettable else None
            self.rows.append({"at": label, "held": held(module, trainer), "peak_rss": peak})
            self.resettable = reset_peak_rss()

        def on_train_batch_end(self, trainer: L.Trainer, module: DistillationModule, *_: object) -> None:
            step = trainer.global_step
            if step == 1:  # the optimizer's moments exist from the first step on
                self._row(trainer, module, "start")
            elif self.pruning.last_event == step:
                self._row(trainer, module, f"event@{step}")

        def on_train_end(self, trainer: L.Trainer, module: DistillationModule) -> None:
            self._row(trainer, module, "end")

    class Batches(L.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            generator = torch.Generator().manual_seed(self.trainer.global_rank)
            batches = []
            for _ in range(args.steps):
                ids = torch.randint(5, args.vocab, (args.batch, args.seq), generator=generator)
                labels = torch.where(torch.rand(ids.shape, generator=generator) < 0.15, ids, -100)
                labels[:, 0] = ids[:, 0]
                batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
            return DataLoader(batches, batch_size=None)

    bare = status_kib("VmRSS") * 1024  # the process before any model: Python, torch, the libraries
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64 or 1,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=max(args.seq, 64),
    )
    teacher = BertForMaskedLM(config)
    module = DistillationModule(
        teacher, {"init": "copy"}, objective=[{"term": "logits"}, {"term": "hidden"}], time_steps=False
    )
    pruning = PruningCallback(
        {"heads": 0.5, "ffn": 0.5, "hidden": 0.5}, end_step=args.steps - 1, interval=args.interval
    )
    probe = Probe(pruning)
    strategy = {"ddp": "ddp", "fsdp2": fsdp2(), "fsdp2-replicated": fsdp2(teacher="replicated")}[args.mode]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.ranks,
        strategy=strategy,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[pruning, probe],
    )
    trainer.fit(module, Batches())
    out = Path(args.out) / args.mode
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"bare": bare, "rows": probe.rows}))


def report(args: argparse.Namespace) -> None:
    runs = {
        mode: [json.loads((Path(args.out) / mode / f"rank{r}.json").read_text()) for r in range(args.ranks)]
        for mode in args.modes
    }

    def peaks(run: dict) -> list[int | None]:
        """Peak RSS above the bare process in each window: up to the first event, between events, to the end."""
        return [None if row["peak_rss"] is None else row["peak_rss"] - run["bare"] for row in run["rows"][1:]]

    def mib(value: int | None) -> str:
        return "n/a" if value is None else f"{value / MIB:.1f}"

    print(
        f"BERT hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.ranks} CPU ranks (gloo)"
    )
    print("model+optimizer: this rank's tensors of the student, its AdamW moments and the teacher")
    print(
        "peak RSS: VmHWM above the bare process, per window (start to the first event, between events, to the end)"
    )
    baseline = runs.get("ddp")
    for mode, ranks in runs.items():
        for rank, run in enumerate(ranks):
            rows, start = run["rows"], run["rows"][0]
            left = ", ".join(f"{row['at']} {row['held'] / start['held']:.2f}" for row in rows[1:])
            windows = peaks(run)
            rss = ", ".join(f"{row['at']} {mib(p)}" for row, p in zip(rows[1:], windows, strict=True))
            line = (
                f"{mode:>17} rank {rank}: model+optimizer {mib(start['held'])} MiB, left after [{left}]; "
                f"peak RSS [{rss}] MiB"
            )
            if baseline is not None and mode != "ddp":
                base = baseline[rank]
                line += f"\n{'':>24}of DDP's: model+optimizer {start['held'] / base['rows'][0]['held']:.2f}"
                ours, theirs = max(windows, key=lambda v: v or 0), max(peaks(base), key=lambda v: v or 0)
                if ours and theirs:
                    line += f", highest peak RSS {ours / theirs:.2f}"
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--interval", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--out", default="fsdp_memory_out")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # one mode's processes (set by the driver)
    args = parser.parse_args()
    if args.mode:
        run_rank(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    for mode in args.modes:
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], check=True, env=env)
    report(args)


if __name__ == "__main__":
    main()
