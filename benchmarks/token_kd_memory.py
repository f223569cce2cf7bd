"""Peak memory of next-token distillation's forward and backward, with the full logits against chunked, on CPU.

N positions of final hidden states (teacher and student, width H) go through two ``nn.Linear`` heads to a
V-token vocabulary, then forward KL (or ``--loss``), the mean over positions, and backward to the student's
hidden states and head. Unchunked builds both ``[N, V]`` logit matrices, their softmaxes and gradients at once
(``token_divergence`` on the whole batch); ``chunked_token_loss`` builds one ``[chunk, V]`` slice at a time and
recomputes it in backward. Configurations alternate within each round, in reversed order every other round, so
that a machine busy with other work weighs on all alike; the medians are compared. The losses and gradients of
every chunked run are checked against the unchunked run's.

How memory is measured: ``torch.profiler.profile(profile_memory=True)`` records every allocation and free of
PyTorch's CPU allocator, with its size (signed) and time; their running sum in time order is the bytes held by
tensors created in the measured region, and its maximum is the peak reported (above whatever was alive before:
the hidden states and the heads). This counts tensors exactly and nothing else. ``tracemalloc`` does not see
them (tensor storage comes from C++ ``posix_memalign``, not Python's allocator), and PyTorch has no CPU
counterpart of ``torch.cuda.max_memory_allocated``. As a cross-check the kernel's peak resident set is read
too: ``VmHWM`` of ``/proc/self/status``, reset before each run by writing 5 to ``/proc/self/clear_refs``,
minus the resident set before the run; it includes the allocator's and the profiler's own overhead, and reads
"n/a" where the kernel refuses the reset. It also depends on glibc's malloc: after a few large frees its
dynamic mmap threshold rises to 32 MiB, so 256-row chunks (31 MiB at V=32000) land on the heap, which grows
rather than reuses them, and the RSS peak of that run reads about 700 MiB against 262 MiB of tensors; with
``MALLOC_MMAP_THRESHOLD_=1048576`` (every large block mmapped, returned at free) the two agree (267 vs 262).

    python benchmarks/token_kd_memory.py       # about 1-2 minutes on 2 cores
    python benchmarks/token_kd_memory.py --positions 2048 --vocab 152064 --chunks 256 1024 --loss jsd
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import torch
from _memory import reset_peak_rss, status_kib
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lightning_kd.objective.generative import chunked_token_loss, token_divergence

MIB = 2**20


def _profiled_peak(prof: profile) -> int:
    """The largest running sum of allocated bytes over the profiler's memory events, in time order."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def measure(step: Callable[[], torch.Tensor]) -> tuple[float, float | None, float, torch.Tensor]:
    """(profiled peak MiB, peak resident-set growth MiB or None, seconds, loss) of one forward and backward."""
    gc.collect()
    resident = status_kib("VmRSS")
    reset = reset_peak_rss()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = time.perf_counter()
        loss = step()
        seconds = time.perf_counter() - start
    rss = (status_kib("VmHWM") - resident) / 1024 if reset else None
    return _profiled_peak(prof) / MIB, rss, seconds, loss


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--positions", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--loss", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    args = parser.parse_args()

    torch.manual_seed(0)
    teacher_head = nn.Linear(args.hidden, args.vocab).requires_grad_(False)
    student_head = nn.Linear(args.hidden, args.vocab)
    # a student head near the teacher's, so that the loss and its gradients are of a trained student's size
    with torch.no_grad():
        student_head.weight.copy_(teacher_head.weight + 0.01 * torch.randn_like(teacher_head.weight))
        student_head.bias.copy_(teacher_head.bias)
    teacher_hidden = torch.randn(args.positions, args.hidden)
    student_hidden = (teacher_hidden + 0.1 * torch.randn_like(teacher_hidden)).requires_grad_()
    parameters = [student_hidden, *student_head.parameters()]

    def unchunked() -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden)
        loss = token_divergence(teacher_logits, student_head(student_hidden), args.loss).mean()
        loss.backward()
        return loss.detach()

    def chunked(size: int) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            loss = chunked_token_loss(
                teacher_hidden, student_hidden, teacher_head, student_head, loss=args.loss, chunk_size=size
            )
            loss.backward()
            return loss.detach()

        return step

    configs: dict[str, Callable[[], torch.Tensor]] = {"unchunked": unchunked}
    configs.update({f"chunk {size}": chunked(size) for size in args.chunks})
    results: dict[str, list[tuple[float, float | None, float]]] = {name: [] for name in configs}
    outputs: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}
    for round_ in range(args.rounds):
        order = list(configs) if round_ % 2 == 0 else list(reversed(configs))
        for name in order:
            for tensor in parameters:
                tensor.grad = None
            peak, rss, seconds, loss = measure(configs[name])
            results[name].append((peak, rss, seconds))
            outputs.setdefault(name, (loss, [t.grad.clone() for t in parameters]))

    logits_mib = args.positions * args.vocab * 4 / MIB
    print(
        f"N={args.positions} positions x V={args.vocab} vocabulary, H={args.hidden}, loss {args.loss}, "
        f"{args.rounds} alternating rounds, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"one [N, V] float32 logit matrix is {logits_mib:.0f} MiB"
    )
    base_peak = statistics.median(r[0] for r in results["unchunked"])
    header = (
        f"{'':<11} {'peak tensors MiB':>17} {'ratio':>7} {'peak RSS MiB':>13} {'time s':>7}  per round (MiB)"
    )
    print(header)
    print("-" * len(header))
    for name, rows in results.items():
        peak = statistics.median(r[0] for r in rows)
        rss_values = [r[1] for r in rows if r[1] is not None]
        rss = f"{statistics.median(rss_values):.0f}" if rss_values else "n/a"
        seconds = statistics.median(r[2] for r in rows)
        rounds = ", ".join(f"{r[0]:.0f}" for r in rows)
        print(f"{name:<11} {peak:>17.0f} {peak / base_peak:>7.3f} {rss:>13} {seconds:>7.2f}  {rounds}")

    reference_loss, reference_grads = outputs["unchunked"]
    print(f"\nloss (unchunked): {reference_loss.item():.6f}")
    for name in configs:
        if name == "unchunked":
            continue
        loss, grads = outputs[name]
        error = max(
            ((g - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, reference_grads, strict=True)
        )
        same = torch.allclose(loss, reference_loss, rtol=1e-5) and error < 1e-4
        print(
            f"{name}: loss {loss.item():.6f}, largest gradient difference {error:.1e} of the largest gradient "
            f"-> {'same' if same else 'DIFFERENT'}"
        )


if __name__ == "__main__":
    main()
