"""What PruningCallback costs per training step: the same distillation with and without it.

Both runs distil the MiniLM-L6-H384 teacher (or a random BERT of its shape) into a copy of itself, on the same
batches; the callback run scores units after every backward, zeroes pruned gradients before every optimizer
step, runs the masked model, and prunes every ``--interval`` steps. Rounds alternate in ABBA order so that drift
in the machine's speed and cache warmth hit both alike; the median step times are compared. Target: ratio <= 1.10.

    python benchmarks/pruning_overhead.py [--steps 20] [--rounds 3] [--batch 16] [--seq 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import batches, lightning_round, teacher_model  # noqa: E402

from lightning_kd import DistillationModule, PruningCallback  # noqa: E402

OBJECTIVE = [{"term": "hidden", "loss": "mse", "layers": "uniform"}, {"term": "relations", "layers": "last"}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--interval", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = teacher_model()
    data = batches(4, args.batch, args.seq, teacher.config.vocab_size)
    plain = DistillationModule(teacher, {"init": "copy"}, objective=OBJECTIVE, schedule="constant")
    pruned = DistillationModule(teacher, {"init": "copy"}, objective=OBJECTIVE, schedule="constant")
    with_callback, without = [], []
    for round_index in range(args.rounds):
        # each round is a fresh schedule over its own steps, so every round prunes as a real run does
        callback = PruningCallback({"hidden": 0.5, "heads": 0.5, "ffn": 0.5}, end_step=args.steps,
                                   interval=args.interval, prune_at_end=False)
        runs = [lambda callback=callback: with_callback.extend(lightning_round(pruned, data, args.steps, (callback,))),
                lambda: without.extend(lightning_round(plain, data, args.steps))]
        for run in runs if round_index % 2 == 0 else runs[::-1]:  # ABBA: each goes second half the time
            run()
        callback._handle.remove()  # the next round starts from the masked weights, without stale hooks
        print(f"round {round_index + 1}/{args.rounds}: with PruningCallback {statistics.median(with_callback):.4f} "
              f"s/step, without {statistics.median(without):.4f} s/step")
    ratio = statistics.median(with_callback) / statistics.median(without)
    print(f"batch {args.batch}x{args.seq}, {torch.get_num_threads()} threads, {len(without)} timed steps each, "
          f"pruning every {args.interval} steps")
    print(f"step time ratio (with PruningCallback / without): {ratio:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
