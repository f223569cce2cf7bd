"""What the per-step time accounting (``time/*``, ``throughput/*``) costs: the same distillation with it on and off.

Both sides are the same DistillationModule instance and Trainer settings (MiniLM-L6-H384 teacher, 3-layer
student, hidden MSE + q/k/v relations, AdamW, a logging step every 10), with its step timer on (the default) and
off; rounds alternate in ABBA order and the median step times are compared. Target: <= 1.01.

    python benchmarks/accounting_overhead.py [--steps 20] [--rounds 4] [--batch 16] [--seq 128]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from step_overhead import OBJECTIVE, batches, lightning_round, teacher_model

from lightning_kd import DistillationModule


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = teacher_model()
    # One module for both sides, its timer switched on and off between rounds: two instances of the same module
    # differ by a few percent on their own (an A/A run of two untimed instances measured 1.036).
    module = DistillationModule(
        teacher, {"init": "layers", "num_layers": 3}, objective=OBJECTIVE, schedule="constant"
    )
    timer = module.step_timer
    data = batches(4, args.batch, args.seq, teacher.config.vocab_size)
    times: dict[bool, list[float]] = {True: [], False: []}
    for index in range(args.rounds):
        for timed in (True, False) if index % 2 == 0 else (False, True):
            module.step_timer = timer if timed else None
            # logging steps every 10, so the timer's per-interval summary is part of what is measured
            times[timed].extend(lightning_round(module, data, args.steps, log_every_n_steps=10))
        print(
            f"round {index + 1}/{args.rounds}: accounting on {statistics.median(times[True]):.4f} s/step, "
            f"off {statistics.median(times[False]):.4f} s/step"
        )
    ratio = statistics.median(times[True]) / statistics.median(times[False])
    print(
        f"batch {args.batch}x{args.seq}, {torch.get_num_threads()} threads, {len(times[True])} timed steps each"
    )
    print(f"step time ratio (accounting on / off): {ratio:.3f}  (target <= 1.01)")


if __name__ == "__main__":
    main()
