"""What the vectorised SQuAD post-processing saves over the per-window loop of the Hugging Face examples.

A dev set's size (SQuAD v2.0 dev: 11,873 questions; 12.5k windows of 384 tokens with a document stride of 128,
so some questions span two windows) with random logits, n_best 20, max_answer_length 30, v2.0's null answer.
Both produce every answer and null odds; rounds alternate their order, and each round checks that the
answers and null odds are the same. Target: vectorised at least 5x faster (reference / vectorised >= 5).

It then sets the whole evaluation (post-processing and the official scoring of every question) against the
forward passes it follows: a BERT-base question-answering model's forward over the same windows, timed on
``--forward-batches`` batches of 32 and scaled to the window count (on this machine's device: a CPU, unless
CUDA is there).

    python benchmarks/squad_postprocess.py [--questions 12000] [--windows 12500] [--rounds 3] [--version 2] [--threads 0]
        [--forward-batches 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from lightning_kd.datamodules.squad_metrics import squad_v1_scores, squad_v2_scores
from lightning_kd.datamodules.squad_postprocess import postprocess, postprocess_reference

TOKENS, QUESTION_TOKENS, STRIDE = 384, 16, 128


def dev_set(
    questions: int, windows: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str], list[str]]:
    """Windows laid out as the tokenizer lays them out ([CLS] question [SEP] context [SEP] padding), one word a
    token, ``windows - questions`` questions long enough for a second window overlapping the first by 128."""
    rng = np.random.default_rng(seed)
    capacity = TOKENS - QUESTION_TOKENS - 3
    step = capacity - STRIDE
    pool = ["".join(rng.choice(list("abcdefghij"), size)) for size in rng.integers(2, 10, 2000)]
    two = np.zeros(questions, dtype=bool)
    two[rng.choice(questions, windows - questions, replace=False)] = True
    offsets = np.full((windows, TOKENS, 2), -1, dtype=np.int64)
    window_question, contexts = [], []
    row = 0
    for index in range(questions):
        words = (
            step + int(rng.integers(capacity - step + 1, capacity + 1))
            if two[index]
            else int(rng.integers(60, capacity + 1))
        )
        texts = [pool[j] for j in rng.integers(0, len(pool), words)]
        lengths = np.array([len(t) for t in texts])
        starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
        spans = np.stack([starts, starts + lengths], axis=1)
        contexts.append(" ".join(texts))
        for first in range(0, step + 1 if two[index] else 1, step):
            part = spans[first : first + capacity]
            offsets[row, QUESTION_TOKENS + 2 : QUESTION_TOKENS + 2 + len(part)] = part
            window_question.append(index)
            row += 1
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(windows, TOKENS, generator=generator)
    end = torch.randn(windows, TOKENS, generator=generator)
    start[:, 0] += 2 * torch.randn(windows, generator=generator) + 2  # a spread of null scores
    ids = [f"q{index}" for index in range(questions)]
    return start, end, torch.from_numpy(offsets), torch.tensor(window_question), contexts, ids


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--questions", type=int, default=12000)
    parser.add_argument("--windows", type=int, default=12500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n-best", type=int, default=20)
    parser.add_argument("--max-answer-length", type=int, default=30)
    parser.add_argument("--version", type=int, choices=(1, 2), default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--forward-batches", type=int, default=2, help="0 skips the forward-pass comparison")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.windows < args.questions or args.windows > 2 * args.questions:
        parser.error("--windows must be between --questions and twice as many")
    inputs = dev_set(args.questions, args.windows)
    settings = dict(n_best=args.n_best, max_answer_length=args.max_answer_length, version_2=args.version == 2)
    runs = {"vectorised": postprocess, "reference loop": postprocess_reference}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for index in range(args.rounds):
        outputs = {}
        for name in runs if index % 2 == 0 else list(runs)[::-1]:
            begin = time.perf_counter()
            outputs[name] = runs[name](*inputs, **settings)
            times[name].append(time.perf_counter() - begin)
        if outputs["vectorised"] != outputs["reference loop"]:
            got, expected = outputs["vectorised"].answers, outputs["reference loop"].answers
            differ = [qid for qid in expected if got[qid] != expected[qid]]
            print(f"round {index + 1}: the answers differ on {len(differ)} questions, e.g. {differ[:3]}")
            sys.exit(1)
        print(
            f"round {index + 1}/{args.rounds}: vectorised {times['vectorised'][-1]:.3f} s, "
            f"reference loop {times['reference loop'][-1]:.3f} s"
        )
    answered = sum(bool(text) for text in outputs["vectorised"].answers.values())
    print(
        f"{args.questions} questions, {args.windows} windows of {TOKENS} tokens, n_best {args.n_best}, "
        f"max_answer_length {args.max_answer_length}, SQuAD v{args.version}.{0 if args.version == 2 else 1} "
        f"({answered} answered), {torch.get_num_threads()} threads, same answers and null odds in every round"
    )
    ratio = statistics.median(times["reference loop"]) / statistics.median(times["vectorised"])
    print(f"time ratio (reference loop / vectorised): {ratio:.1f}  (target >= 5)")
    per_round = statistics.median(
        r / v for r, v in zip(times["reference loop"], times["vectorised"], strict=True)
    )
    print(f"  median of per-round ratios: {per_round:.1f}")
    if args.forward_batches:
        evaluation = statistics.median(times["vectorised"]) + scoring_time(
            inputs, outputs["vectorised"], args
        )
        forward = forward_time(args.windows, args.forward_batches)
        print(
            f"whole evaluation (post-processing + official scores) {evaluation:.2f} s against BERT-base's forward "
            f"passes over the {args.windows} windows {forward:.0f} s: {100 * evaluation / forward:.3g}% of them"
        )


def scoring_time(inputs: tuple, answers: object, args: argparse.Namespace) -> float:
    """The official scores of every question, its gold answers made from the contexts' words."""
    _, _, _, _, contexts, ids = inputs
    rng = np.random.default_rng(1)
    golds = {
        qid: [] if args.version == 2 and rng.random() < 0.5 else [" ".join(context.split()[:3])]
        for qid, context in zip(ids, contexts, strict=True)
    }
    begin = time.perf_counter()
    if args.version == 2:
        squad_v2_scores(answers.answers, golds, answers.null_odds, threshold=float("inf"))
    else:
        squad_v1_scores(answers.answers, golds)
    return time.perf_counter() - begin


@torch.no_grad()
def forward_time(windows: int, batches: int, batch_size: int = 32) -> float:
    """Seconds for a BERT-base QA model's forward over ``windows`` windows of 384 tokens, from ``batches`` timed
    batches (after one warm-up) scaled up."""
    from transformers import BertConfig, BertForQuestionAnswering

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = BertForQuestionAnswering(BertConfig()).eval().to(device)
    ids = torch.randint(1000, 30000, (batch_size, TOKENS), device=device)
    model(input_ids=ids)
    begin = time.perf_counter()
    for _ in range(batches):
        model(input_ids=ids).start_logits.sum().item()
    return (time.perf_counter() - begin) / (batches * batch_size) * windows


if __name__ == "__main__":
    main()
