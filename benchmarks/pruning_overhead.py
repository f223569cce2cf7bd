"""What PruningCallback costs per training step between events: the same distillation with and without it.

Both runs distil the MiniLM-L6-H384 teacher (or a random BERT of its shape) into a copy of itself already
pruned to half its heads, FFN neurons and hidden dimensions, on the same batches, so that both compute the
same student; the callback run scores units after every backward (and, with ``--mode masked``, runs the
masked full-size model and zeroes pruned gradients, against the full-size model without it). Event steps
are left out: ``homodistil_shrinking.py`` measures those. Rounds alternate in ABBA order so that drift in the
machine's speed and cache warmth hit both alike; the median step times are compared. Target (shrinking, the
default): ratio <= 1.05.

    python benchmarks/pruning_overhead.py [--mode physical|masked|both] [--steps 20] [--rounds 3]
        [--batch 16] [--seq 128] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_overhead  # noqa: E402
from step_overhead import batches, lightning_round, teacher_model  # noqa: E402

from lightning_kd import DistillationModule, PruningCallback  # noqa: E402
from lightning_kd.pruning import full_masks  # noqa: E402
from lightning_kd.pruning.shrink import rebuild_shape_, student_shape  # noqa: E402

OBJECTIVE = [
    {"term": "hidden", "loss": "mse", "layers": "uniform"},
    {"term": "relations", "layers": "last_layer"},
]
TARGET = {"hidden": 0.5, "heads": 0.5, "ffn": 0.5}


def half_masks(module: DistillationModule) -> dict[str, torch.Tensor]:
    """Keep the first half of every kind (which units does not matter for timing)."""
    masks = {kind: full_masks(module.student)[kind] for kind in TARGET}
    for mask in masks.values():
        mask[..., mask.shape[-1] // 2 :] = False
    return masks


def prepared(teacher: torch.nn.Module, physical: bool) -> tuple[DistillationModule, dict[str, torch.Tensor]]:
    module = DistillationModule(teacher, {"init": "copy"}, objective=OBJECTIVE, schedule="constant")
    masks = half_masks(module)
    if physical:  # the student as a shrinking run holds it between two events
        shape = student_shape(module.student)
        shape = {
            "heads": [h // 2 for h in shape["heads"]],
            "ffn": [f // 2 for f in shape["ffn"]],
            "hidden": shape["hidden"] // 2,
        }
        kept = rebuild_shape_(module.student, shape)
        module.objective.narrow_student_width(kept)
    return module, masks


def compare(teacher: torch.nn.Module, data: list, args: argparse.Namespace, physical: bool) -> float:
    pruned, masks = prepared(teacher, physical)
    plain, _ = (
        prepared(teacher, physical)
        if physical
        else (DistillationModule(teacher, {"init": "copy"}, objective=OBJECTIVE, schedule="constant"), None)
    )
    with_callback, without = [], []
    per_round = []
    for round_index in range(args.rounds):
        # the schedule's only event is the last step, which is not timed; units are scored at every step
        callback = PruningCallback(
            TARGET,
            end_step=args.steps,
            interval=args.steps,
            prune_at_end=False,
            physical=physical,
            expect_copy=False,
        )
        callback.masks = {kind: mask.clone() for kind, mask in masks.items()}
        runs = [
            lambda callback=callback: with_callback.extend(
                lightning_round(pruned, data, args.steps, (callback,))[:-1]
            ),
            lambda: without.extend(lightning_round(plain, data, args.steps)[:-1]),
        ]
        for run in runs if round_index % 2 == 0 else runs[::-1]:  # ABBA: each goes second half the time
            run()
        handle = getattr(callback.strategy, "handle", None)  # the masking strategy's hooks
        if handle is not None:
            handle.remove()  # the next round installs its own hooks
        timed = args.steps - 2  # per run: the first step and the event step are left out
        this = statistics.median(with_callback[-timed:]) / statistics.median(without[-timed:])
        per_round.append(this)
        print(
            f"{'shrinking' if physical else 'masked'} round {round_index + 1}/{args.rounds}: with PruningCallback "
            f"{statistics.median(with_callback):.4f} s/step, without {statistics.median(without):.4f} s/step "
            f"(this round's ratio {this:.3f})"
        )
    # on a shared machine the load drifts between rounds: the median of each round's own ratio resists that
    print(f"  median of per-round ratios: {statistics.median(per_round):.3f}")
    return statistics.median(with_callback) / statistics.median(without)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=["physical", "masked", "both"], default="physical")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="as in step_overhead.py")
    args = parser.parse_args()
    if args.clock == "cpu":
        step_overhead.CLOCK = time.process_time
    torch.manual_seed(0)
    teacher = teacher_model()
    data = batches(4, args.batch, args.seq, teacher.config.vocab_size)
    modes = {"physical": [True], "masked": [False], "both": [True, False]}[args.mode]
    ratios = {physical: compare(teacher, data, args, physical) for physical in modes}
    print(
        f"batch {args.batch}x{args.seq}, {torch.get_num_threads()} threads, {args.rounds} rounds of "
        f"{args.steps - 2} timed steps each, between events"
    )
    for physical, ratio in ratios.items():
        name = "shrinking (physical=True)" if physical else "masks (physical=False)"
        print(f"{name}: step time ratio (with PruningCallback / without): {ratio:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
