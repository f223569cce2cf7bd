"""HomoDistil (prune a little at a time while distilling) against prune-once-then-distil, at small scale.

Both start from a copy of the MiniLM-L6-H384 teacher, distil on Python's docstrings for the same number of
steps with the same objective, and end at the same size (half the heads, FFN neurons and hidden dimensions).
- iterative: PruningCallback with the cubic schedule, pruning every few steps until 3/4 of the run;
- prune once: the same importance scores gathered over the first steps, then everything pruned at once at
  step ``--score-steps``, then distillation at the final size for the rest of the run.
The discrepancy (1 - linear CKA per layer, averaged; and the hidden-state MSE term) is measured every
``--every`` steps on fixed held-out batches, plotted in one PNG, and the final values are printed.

    python benchmarks/homodistil_vs_prune_once.py [--steps 120] [--out docs/homodistil_vs_prune_once.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import matplotlib
import torch
from _common import TEACHER, held_out_batches

from lightning_kd import DistillationModule, PretrainingDataModule, PruningCallback
from lightning_kd.hub import load_model

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OBJECTIVE = [
    {"term": "hidden", "loss": "mse", "layers": "uniform"},
    {"term": "relations", "layers": "last_layer", "num_relation_heads": 8},
]
TARGET = {"hidden": 0.5, "heads": 0.5, "ffn": 0.5}


class Probe(L.Callback):
    """The discrepancy on fixed held-out batches every ``every`` steps (and before the first)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], every: int) -> None:
        self.batches, self.every, self.curve = batches, every, []

    def _measure(self, trainer: L.Trainer, pl_module: DistillationModule) -> None:
        values = pl_module.discrepancy(self.batches)
        pl_module.student.eval()  # as `discrepancy` does: dropout would add its own noise to the distance
        with torch.no_grad():
            mse = sum(
                float(
                    pl_module.objective(pl_module.teacher_features(b), pl_module.student_features(b), b)[1][
                        "hidden_mse"
                    ]
                )
                for b in self.batches
            ) / len(self.batches)
        pl_module.student.train()
        self.curve.append((trainer.global_step, values["discrepancy/hidden"], mse))

    def on_train_start(self, trainer: L.Trainer, pl_module: DistillationModule) -> None:
        self._measure(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: DistillationModule, *args: object) -> None:
        if trainer.global_step % self.every == 0:
            self._measure(trainer, pl_module)


def run(name: str, pruning: PruningCallback, steps: int, probe_batches: list, every: int, seed: int) -> list:
    L.seed_everything(seed, verbose=False)
    teacher = load_model(TEACHER)
    module = DistillationModule(
        teacher, {"init": "copy"}, objective=OBJECTIVE, learning_rate=3e-4, warmup_steps=0.05
    )
    probe = Probe(probe_batches, every)
    data = PretrainingDataModule(TEACHER, sources=["docstrings"], max_length=128, batch_size=8, seed=seed)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruning, probe],
    )
    trainer.fit(module, data)
    print(
        f"{name}: final discrepancy/hidden {probe.curve[-1][1]:.4f}, hidden MSE {probe.curve[-1][2]:.4f}, "
        f"student {sum(p.numel() for p in module.student.parameters()) / 1e6:.2f}M parameters"
    )
    return probe.curve


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--score-steps", type=int, default=10)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--out", default="docs/homodistil_vs_prune_once.png")
    args = parser.parse_args()
    probe_batches = held_out_batches()

    end = args.steps * 3 // 4
    iterative = run(
        "iterative (HomoDistil)",
        PruningCallback(TARGET, end_step=end, interval=5),
        args.steps,
        probe_batches,
        args.every,
        seed=0,
    )
    once = run(
        "prune once, then distil",
        PruningCallback(TARGET, end_step=args.score_steps, interval=args.score_steps, schedule="one-shot"),
        args.steps,
        probe_batches,
        args.every,
        seed=0,
    )

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, curve in (("iterative (HomoDistil)", iterative), ("prune once, then distil", once)):
        steps = [c[0] for c in curve]
        axes[0].plot(steps, [c[1] for c in curve], marker="o", label=label)
        axes[1].plot(steps, [c[2] for c in curve], marker="o", label=label)
    axes[0].set_title("discrepancy/hidden (1 - linear CKA, mean over layers)")
    axes[1].set_title("hidden-state MSE to the teacher")
    for axis in axes:
        axis.set_xlabel("step")
        axis.legend()
    figure.suptitle("MiniLM-L6-H384 pruned to half width while distilling, docstrings corpus")
    figure.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=100)
    print(f"plot written to {args.out}")


if __name__ == "__main__":
    main()
