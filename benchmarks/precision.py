"""Steps per second and peak memory of a HomoDistil step in float32, bf16-mixed, with a bf16 teacher, and compiled.

Two shapes: ``tiny`` is experiments/homodistil/tiny_offline.yaml (MiniLM-L6-H384 teacher and its copy as the
student, pruning on, hidden MSE + q/k/v relations), ``base`` is experiments/homodistil/homobert_base.yaml's
BERT-base (random weights: speed and memory do not depend on them). Each setting runs in its own process so
that peak memory is its own: ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on a CPU.
Ratios are against float32 measured in the same run.

    python benchmarks/precision.py [--shape tiny|base] [--steps 12] [--batch 8] [--seq 128] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SETTINGS = {
    "float32": {"precision": "32-true"},
    "bf16-mixed": {"precision": "bf16-mixed"},
    "bf16-mixed, bf16 teacher": {"precision": "bf16-mixed", "teacher_dtype": "bfloat16"},
    "float32, compiled": {"precision": "32-true", "compile": True},
}
OBJECTIVE = [
    {"term": "hidden", "loss": "mse", "layers": "uniform"},
    {"term": "relations", "layers": "last_layer"},
]


def measure(shape: str, setting: str, steps: int, batch: int, seq: int, device: str) -> dict[str, float]:
    import lightning as L
    import torch
    from transformers import BertConfig, BertModel

    from lightning_kd import DistillationModule, PruningCallback
    from lightning_kd.hub import load_model

    torch.manual_seed(0)
    if shape == "tiny":
        try:
            teacher = load_model("sentence-transformers/all-MiniLM-L6-v2")
        except OSError:
            teacher = BertModel(
                BertConfig(
                    hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
                ),
                add_pooling_layer=False,
            )
    else:
        teacher = BertModel(BertConfig(), add_pooling_layer=False)
    options = dict(SETTINGS[setting])
    precision = options.pop("precision")
    module = DistillationModule(teacher, {"init": "copy"}, objective=OBJECTIVE, **options)
    generator = torch.Generator().manual_seed(0)
    data = [
        {
            "input_ids": torch.randint(1000, teacher.config.vocab_size, (batch, seq), generator=generator),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        }
        for _ in range(4)
    ]
    marks: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_end(self, *args: object) -> None:
            if device == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    pruning = PruningCallback({"heads": 0.5, "ffn": 0.5, "hidden": 0.5}, interval=4, prune_at_end=False)
    trainer = L.Trainer(
        accelerator=device,
        devices=1,
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruning, Clock()],
        log_every_n_steps=10,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    warm = marks[2:]  # the first steps build the optimizer (and compile)
    steps_per_s = (len(warm) - 1) / (warm[-1] - warm[0])
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"steps_per_s": steps_per_s, "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=("tiny", "base"), default="tiny")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.shape, args.one, args.steps, args.batch, args.seq, args.device)))
        return
    results = {}
    for setting in args.settings:
        command = [
            sys.executable,
            __file__,
            "--one",
            setting,
            "--shape",
            args.shape,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--device",
            args.device,
        ]
        run = subprocess.run(
            command, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"}
        )
        if run.returncode:
            print(f"{setting}: failed\n{run.stderr[-2000:]}")
            continue
        results[setting] = json.loads(run.stdout.strip().splitlines()[-1])
        print(
            f"{setting:26s} {results[setting]['steps_per_s']:.3f} steps/s   peak {results[setting]['peak_mb']:.0f} MB",
            flush=True,
        )
    base = results.get("float32")
    if base:
        print(f"{args.shape}, batch {args.batch}x{args.seq}, {args.device}; against float32 in the same run:")
        for setting, value in results.items():
            print(
                f"  {setting:26s} speed x{value['steps_per_s'] / base['steps_per_s']:.2f}   "
                f"peak memory x{value['peak_mb'] / base['peak_mb']:.2f}"
            )


if __name__ == "__main__":
    main()
