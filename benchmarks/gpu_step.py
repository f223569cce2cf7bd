"""How close a distillation step comes to the hardware: the HomoBERT-base step against a plain Hugging Face
MLM step, in model FLOPs utilisation (MFU), time, throughput and peak memory. Its point is a GPU; on a CPU it
runs with a tiny shape so that it is tested and its output can be read.

Each run is its own process (a clean peak-memory counter, no compile caches shared):
- ``hf_student``: the reference. A plain Hugging Face ``BertForMaskedLM`` training step of the student alone
  (``model(**batch, labels=labels).loss``, logits at every position), AdamW, the same precision.
- ``teacher_inference``: the teacher's forward pass alone (no grad), as Hugging Face runs it.
- ``distill``: ``DistillationModule`` in Lightning with the homobert recipes' objective (prediction KL, hidden
  MSE over the uniform map, MLM cross-entropy; heads at the masked positions), the student a copy of the teacher.
- ``distill_pruning``: the same with ``PruningCallback`` (PLATON importance every step, the masked student after
  the one event, which falls mid-run and which the median step time leaves out).
- ``distill_pruned``: a student physically pruned to homobert_base's target width (hidden 576, 9 heads, FFN
  2304) with ``prune_model`` before training: what the step costs once the schedule has reached the target.
  [SLOT: physical shrinking during training is being built on another branch; when it lands, add a
  ``distill_shrinking`` run here with the PruningCallback option that shrinks at every event.]

MFU = model FLOPs / time / the device's dense bf16 peak. Model FLOPs: the teacher's forward plus the student's
forward and backward (3x forward), counting the encoder at every token and the prediction head only at the
masked positions (the work the losses need; the plain HF step does more, which MFU does not credit).
Peak memory of ``distill`` is compared with ``hf_student`` + ``teacher_inference`` (target <= 1.1).

    python benchmarks/gpu_step.py                                  # CPU, tiny shape, float32
    python benchmarks/gpu_step.py --shape base --device cuda        # BERT-base, 128 x 128, bf16-mixed
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

RUNS = ("hf_student", "teacher_inference", "distill", "distill_pruning", "distill_pruned")
OBJECTIVE = [
    {"term": "logits", "temperature": 1.0, "weight": 1.0},
    {"term": "hidden", "loss": "mse", "layers": "uniform", "weight": 1.0},
    {"term": "task", "weight": 1.0},
]
SHAPES = {
    # BERT-base (bert-base-uncased's config), homobert_base's target
    "base": {"config": {}, "target": {"hidden": 576, "heads": 9, "ffn": 2304}, "batch": 128, "seq": 128},
    # the vocabulary stays BERT's: the prediction head is the point
    "tiny": {
        "config": {
            "hidden_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 512,
        },
        "target": {"hidden": 96, "heads": 3, "ffn": 384},
        "batch": 8,
        "seq": 64,
    },
}
# dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets)
PEAK_TFLOPS = {
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "H200": 989.4,
    "A100": 312.0,
    "L4": 121.0,
    "A10": 125.0,
}


def forward_flops(config: Any, tokens: int, seq: int, predicted: int) -> float:
    """Matmul FLOPs of one forward pass: the blocks at every token, the MLM head at ``predicted`` positions."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_token = layers * (2 * 4 * h * h + 2 * 2 * h * inter + 2 * 2 * seq * h)  # q,k,v,o + FFN + scores, mix
    head = 2 * h * h + 2 * h * config.vocab_size
    return tokens * per_token + predicted * head


def device_peak(device: str, given: float | None) -> float | None:
    if given:
        return given * 1e12
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value * 1e12
    return None


def measure(run: str, shape: str, steps: int, batch: int, seq: int, device: str, precision: str) -> dict:
    import lightning as L
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from lightning_kd import DistillationModule, PruningCallback
    from lightning_kd.datamodules import with_prediction_positions
    from lightning_kd.pruning import prune_model, top_units, unit_counts

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.manual_seed(0)
    teacher = BertForMaskedLM(BertConfig(**SHAPES[shape]["config"])).eval()
    generator = torch.Generator().manual_seed(0)
    data = []
    for _ in range(4):
        ids = torch.randint(1000, teacher.config.vocab_size, (batch, seq), generator=generator)
        chosen = torch.rand(batch, seq, generator=generator) < 0.15
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        data.append(
            with_prediction_positions(
                {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
            )
        )
    autocast = precision == "bf16-mixed"
    dev = torch.device(device)
    marks: list[float] = []
    split: dict[str, float] = {}

    def mark() -> None:
        if device == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    student_config = teacher.config
    if run in ("hf_student", "teacher_inference"):
        model = teacher.to(dev)
        if run == "hf_student":
            import copy

            model = copy.deepcopy(teacher).train().requires_grad_(True)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        mark()
        for step in range(steps):
            batch_data = {
                k: v.to(dev, non_blocking=True)
                for k, v in data[step % len(data)].items()
                if k != "prediction_positions"
            }
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                if run == "teacher_inference":
                    with torch.no_grad():
                        model(input_ids=batch_data["input_ids"], attention_mask=batch_data["attention_mask"])
                else:
                    loss = model(**batch_data).loss
            if run == "hf_student":
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            mark()
    else:
        student: Any = {"init": "copy"}
        callbacks: list[L.Callback] = []
        if run == "distill_pruned":
            target = SHAPES[shape]["target"]
            copy_model = BertForMaskedLM(teacher.config)
            copy_model.load_state_dict(teacher.state_dict())
            counts = unit_counts(copy_model)
            # which units are kept does not change the cost; the first ones by a random score
            masks = {
                "hidden": top_units(torch.rand(counts["hidden"]), target["hidden"]),
                "heads": top_units(torch.rand(len(counts["heads"]), max(counts["heads"])), target["heads"]),
                "ffn": top_units(torch.rand(len(counts["ffn"]), max(counts["ffn"])), target["ffn"]),
            }
            student = prune_model(copy_model, masks)
            student_config = student.config
        if run == "distill_pruning":
            callbacks.append(
                PruningCallback(
                    SHAPES[shape]["target"],
                    start_step=0,
                    end_step=steps,
                    interval=max(steps // 2, 1),
                    prune_at_end=False,
                )
            )

        class Clock(L.Callback):
            def on_train_start(self, *args: Any) -> None:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                mark()

            def on_train_batch_end(self, *args: Any) -> None:
                mark()

        module = DistillationModule(
            teacher, student, objective=OBJECTIVE, task="masked-lm", schedule="constant"
        )
        interval = max(steps // 2, 1)
        trainer = L.Trainer(
            accelerator=device,
            devices=1,
            precision=precision,
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[*callbacks, Clock()],
            log_every_n_steps=interval,
        )
        loader = torch.utils.data.DataLoader(data, batch_size=None, pin_memory=device == "cuda")
        trainer.fit(module, loader)
        split = {k: float(v) for k, v in trainer.logged_metrics.items() if k.startswith("time/")}
    times = [b - a for a, b in zip(marks, marks[1:], strict=False)][2:]  # the first steps build state
    step_s = statistics.median(times)
    tokens = batch * seq
    predicted = sum(len(d["prediction_positions"]) for d in data) / len(data)
    teacher_fwd = forward_flops(teacher.config, tokens, seq, predicted)
    if run == "teacher_inference":
        flops = forward_flops(teacher.config, tokens, seq, predicted)
    elif run == "hf_student":
        flops = 3 * forward_flops(teacher.config, tokens, seq, predicted)
    else:
        flops = teacher_fwd + 3 * forward_flops(student_config, tokens, seq, predicted)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    return {
        "ms_per_step": step_s * 1e3,
        "tokens_per_s": tokens / step_s,
        "peak_mb": peak_mb,
        "flops_per_step": flops,
        "split": split,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=tuple(SHAPES), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on cuda, 32-true on cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--batch", type=int, default=None, help="per device; default: the shape's (128 for base)"
    )
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--runs", nargs="*", default=list(RUNS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    batch, seq = args.batch or SHAPES[args.shape]["batch"], args.seq or SHAPES[args.shape]["seq"]
    if args.one:
        result = measure(args.one, args.shape, args.steps, batch, seq, args.device, precision)
        print(json.dumps(result))
        return
    peak = device_peak(args.device, args.peak_tflops)
    results: dict[str, dict] = {}
    for run in args.runs:
        command = [
            sys.executable,
            __file__,
            "--one",
            run,
            "--shape",
            args.shape,
            "--device",
            args.device,
            "--precision",
            precision,
            "--steps",
            str(args.steps),
            "--batch",
            str(batch),
            "--seq",
            str(seq),
        ]
        done = subprocess.run(
            command, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"}
        )
        if done.returncode:
            print(f"{run}: failed\n{done.stderr[-3000:]}", flush=True)
            continue
        result = results[run] = json.loads(done.stdout.strip().splitlines()[-1])
        mfu = (
            f"MFU {result['flops_per_step'] / (result['ms_per_step'] / 1e3) / peak:.1%}"
            if peak
            else "MFU n/a"
        )
        print(
            f"{run:18s} {result['ms_per_step']:9.1f} ms/step  {result['tokens_per_s']:9.0f} tokens/s  "
            f"peak {result['peak_mb']:7.0f} MB  {mfu}  model {result['flops_per_step'] / 1e9:.1f} GFLOP/step",
            flush=True,
        )
        if result["split"]:
            print(
                "    "
                + "  ".join(f"{k[5:-3]} {v:.1f}" for k, v in sorted(result["split"].items()))
                + "  (ms)"
            )
    device = args.device if args.device == "cpu" else __import__("torch").cuda.get_device_name()
    print(
        f"{args.shape}, {batch}x{seq} per device, {precision}, {device}"
        + (f", bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else "")
    )
    if {"distill", "hf_student", "teacher_inference"} <= set(results):
        alone = results["hf_student"]["peak_mb"] + results["teacher_inference"]["peak_mb"]
        print(
            f"peak memory: distillation / (student training + teacher inference) = "
            f"{results['distill']['peak_mb'] / alone:.2f}  (target <= 1.1)"
        )
    if {"distill", "hf_student"} <= set(results):
        d, h = results["distill"], results["hf_student"]
        print(
            f"distillation step / plain HF student step: {d['ms_per_step'] / h['ms_per_step']:.2f}x the time for "
            f"{d['flops_per_step'] / h['flops_per_step']:.2f}x the model FLOPs; MFU ratio "
            f"{(d['flops_per_step'] / d['ms_per_step']) / (h['flops_per_step'] / h['ms_per_step']):.2f} "
            "(goal on H100/H200: >= 1, and distillation MFU >= 45%)"
        )


if __name__ == "__main__":
    main()
