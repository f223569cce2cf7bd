"""HomoDistil that shrinks at every event against HomoDistil that masks: the same run, timed, and counted.

Measured (a CPU-sized shape): a BERT of MiniLM-L6-H384's shape with an MLM head (30,522 tokens) distilled into a
copy of itself and pruned to homobert_small's fractions (hidden 1/3, heads 4 of 12, FFN 1/3) along the cubic
schedule, which ends halfway through the run; objective prediction KL + hidden MSE + MLM, as homobert_small.
Each mode runs in a fresh process (so that peak memory is its own), rounds alternate in ABBA order. Printed:
wall-clock ratio shrink/mask (target <= 0.65), peak RSS ratio, checkpoint size ratio, the cost of one shrink
event, and a plot of step time against step for both modes.

Counted (homobert_small's shape, analytically): total training FLOPs of the recipe's 28k steps when the
student shrinks at every event against when it stays full size (target <= 0.5), with the teacher's forward
pass and without it.

    python benchmarks/homodistil_shrinking.py [--steps 30] [--rounds 2] [--batch 8] [--seq 128]
        [--plot docs/homodistil_shrinking.png]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from _common import StepTimer
from transformers import BertConfig, BertForMaskedLM

from lightning_kd import DistillationModule, PruningCallback

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "experiments" / "homodistil" / "homobert_small.yaml"
OBJECTIVE = [
    {"term": "logits", "temperature": 1.0},
    {"term": "hidden", "loss": "mse", "layers": "uniform"},
    {"term": "task"},
]
MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
# bert-base-uncased, the recipe's teacher (its config is not downloadable here; these are its published sizes)
BERT_BASE = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    vocab_size=30522,
    head_size=64,
)
MLM_SHARE = 0.15  # predictions are computed only where MLM masked a token


# ---------------------------------------------------------------------------------------------- measured


def mlm_batches(count: int, batch: int, seq: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(1000, vocab, (batch, seq), generator=generator)
        labels = torch.full_like(ids, -100)
        chosen = torch.rand(batch, seq, generator=generator) < MLM_SHARE
        labels[chosen] = ids[chosen]
        ids[chosen] = 103
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def worker(mode: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    config = BertConfig(**MINILM, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
    teacher = BertForMaskedLM(config).eval()
    module = DistillationModule(
        teacher,
        {"init": "copy"},
        objective=OBJECTIVE,
        task="masked-lm",
        schedule="constant",
        time_steps=False,
    )
    pruning = PruningCallback(
        {"hidden": 128, "heads": 4, "ffn": 512},
        end_step=args.steps // 2,
        interval=args.interval,
        prune_at_end=False,
        physical=mode == "shrink",
    )
    events: list[float] = []
    prune_event = pruning._prune_event

    def timed_event(*a: object) -> None:
        start = time.perf_counter()
        prune_event(*a)
        events.append(time.perf_counter() - start)

    pruning._prune_event = timed_event
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruning, timer],
        log_every_n_steps=50,
    )
    data = mlm_batches(4, args.batch, args.seq, config.vocab_size)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "last.ckpt"
        trainer.save_checkpoint(path)
        checkpoint = path.stat().st_size
    return {
        "times": timer.times,
        "events": events,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "checkpoint": checkpoint,
        "params": pruning.widths()["params"],
    }


def measure(args: argparse.Namespace) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {"shrink": [], "mask": []}
    for round_index in range(args.rounds):
        order = ["shrink", "mask"] if round_index % 2 == 0 else ["mask", "shrink"]  # ABBA
        for mode in order:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                command = [
                    sys.executable,
                    __file__,
                    "--worker",
                    mode,
                    "--out",
                    out.name,
                    "--steps",
                    str(args.steps),
                    "--batch",
                    str(args.batch),
                    "--seq",
                    str(args.seq),
                    "--interval",
                    str(args.interval),
                ]
                subprocess.run(
                    command,
                    check=True,
                    env={**os.environ, "PYTHONWARNINGS": "ignore"},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                results[mode].append(json.loads(Path(out.name).read_text()))
            total = sum(results[mode][-1]["times"])
            print(f"round {round_index + 1}/{args.rounds} {mode:>6}: {total:.1f} s for {args.steps} steps")
    return results


def plot(results: dict[str, list[dict]], path: Path, args: argparse.Namespace) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 3.5))
    axes = figure.add_subplot()
    for mode, label in (("mask", "masks (physical=False)"), ("shrink", "shrinking (physical=True)")):
        per_step = [statistics.median(run["times"][i] for run in results[mode]) for i in range(args.steps)]
        axes.plot(range(1, args.steps + 1), per_step, label=label, marker=".")
    axes.axvline(args.steps // 2, color="grey", linestyle=":", label="schedule ends")
    axes.set_xlabel("step")
    axes.set_ylabel("step time (s), median over rounds")
    axes.set_title(f"HomoDistil, MiniLM-L6-H384 shape, batch {args.batch}x{args.seq}, 2-core CPU")
    axes.legend()
    figure.tight_layout()
    FigureCanvasAgg(figure).print_png(str(path))


# ---------------------------------------------------------------------------------------------- counted


def forward_flops_per_token(
    hidden: int, heads: int, ffn: int, layers: int, seq: int, vocab: int, head_size: int = 64
) -> float:
    """Multiply-adds x 2 of one token's forward pass: the blocks, plus the MLM head where MLM masked a token."""
    attention = heads * head_size
    block = (
        2 * hidden * 3 * attention + 2 * 2 * seq * attention + 2 * attention * hidden + 2 * 2 * hidden * ffn
    )
    head = MLM_SHARE * (2 * hidden * hidden + 2 * hidden * vocab)
    return layers * block + head


def homobert_small_flops(recipe_granularity: bool = True) -> dict[str, float]:
    recipe = yaml.safe_load(RECIPE.read_text())
    steps = recipe["trainer"]["max_steps"]
    seq = recipe["data"]["init_args"]["max_length"]
    options = next(
        c["init_args"] for c in recipe["trainer"]["callbacks"] if c["class_path"].endswith("PruningCallback")
    )
    schedule = PruningCallback(
        options["target"],
        start_step=options.get("start_step", 0),
        end_step=options["end_step"],
        interval=options["interval"],
        schedule=options.get("schedule", "cubic"),
        granularity=options.get("granularity") if recipe_granularity else None,
    )
    base = BERT_BASE
    schedule.full = {
        "hidden": base["hidden_size"],
        "heads": base["num_attention_heads"],
        "ffn": base["intermediate_size"],
    }
    schedule.goal = {kind: schedule._resolve(kind, value) for kind, value in options["target"].items()}

    def student(shape: dict[str, int]) -> float:  # forward + backward (twice the forward)
        return 3 * forward_flops_per_token(
            shape["hidden"], shape["heads"], shape["ffn"], base["num_hidden_layers"], seq, base["vocab_size"]
        )

    full = student(schedule.full)
    teacher = forward_flops_per_token(
        base["hidden_size"],
        base["num_attention_heads"],
        base["intermediate_size"],
        base["num_hidden_layers"],
        seq,
        base["vocab_size"],
    )
    shrinking, shape = 0.0, dict(schedule.full)
    shapes = {tuple(shape.values())}
    for step in range(steps):
        shrinking += student(shape)
        done = step + 1  # an event after this step (global_step == done) sets the shape of the next ones
        if (
            done > schedule.start_step
            and done <= schedule.end_step
            and ((done - schedule.start_step) % schedule.interval == 0 or done == schedule.end_step)
        ):
            shape = {**shape, **schedule.keep_counts(done)}
            shapes.add(tuple(shape.values()))
    return {
        "total": (steps * teacher + shrinking) / (steps * (teacher + full)),
        "student": shrinking / (steps * full),
        "steps": steps,
        "end_step": schedule.end_step,
        "shapes": len(shapes),
    }


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--interval", type=int, default=2)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--worker", choices=["shrink", "mask"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.out.write_text(json.dumps(worker(args.worker, args)))
        return

    for recipe_granularity in (True, False):
        counted = homobert_small_flops(recipe_granularity)
        print(
            f"homobert_small ({counted['steps']} steps, pruned until step {counted['end_step']}, granularity "
            f"{'of the recipe' if recipe_granularity else '1'}): training FLOPs shrink/mask {counted['total']:.3f} "
            f"with the teacher's forward (target <= 0.5), {counted['student']:.3f} for the student alone; "
            f"{counted['shapes']} distinct student shapes"
        )

    results = measure(args)

    def median(mode: str, key: str) -> float:
        return statistics.median(run[key] for run in results[mode])

    wall = statistics.median(sum(r["times"]) for r in results["shrink"]) / statistics.median(
        sum(r["times"]) for r in results["mask"]
    )
    late = [statistics.median(r["times"][args.steps // 2 + 1 :]) for r in results["shrink"]]
    late_mask = [statistics.median(r["times"][args.steps // 2 + 1 :]) for r in results["mask"]]
    events = [e for run in results["shrink"] for e in run["events"]]
    mask_events = [e for run in results["mask"] for e in run["events"]]
    print(
        f"MiniLM-L6-H384 shape with MLM head, batch {args.batch}x{args.seq}, {args.steps} steps, schedule ends at "
        f"step {args.steps // 2}, an event every {args.interval} steps, {torch.get_num_threads()} threads, "
        f"{args.rounds} rounds ABBA"
    )
    print(f"wall-clock shrink/mask: {wall:.3f}  (target <= 0.65)")
    print(
        f"step time after the schedule: shrink {statistics.median(late):.3f} s, mask "
        f"{statistics.median(late_mask):.3f} s, ratio {statistics.median(late) / statistics.median(late_mask):.3f}"
    )
    print(
        f"peak RSS shrink/mask: {median('shrink', 'peak_rss') / median('mask', 'peak_rss'):.3f}  "
        f"({median('shrink', 'peak_rss') / 2**20:.0f} MiB vs {median('mask', 'peak_rss') / 2**20:.0f} MiB, teacher "
        "and Python included)"
    )
    print(
        f"checkpoint size shrink/mask (end of run): {median('shrink', 'checkpoint') / median('mask', 'checkpoint'):.3f}"
        f"  ({median('shrink', 'checkpoint') / 2**20:.1f} MiB vs {median('mask', 'checkpoint') / 2**20:.1f} MiB)"
    )
    print(
        f"one event: shrink {1000 * statistics.median(events):.1f} ms (max {1000 * max(events):.1f}), "
        f"mask {1000 * statistics.median(mask_events):.1f} ms"
    )
    if args.plot:
        plot(results, args.plot, args)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
