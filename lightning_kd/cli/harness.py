"""``lightning-kd harness``: score an exported model on lm-evaluation-harness tasks (not a Trainer run)."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_kd.training.harness import HarnessNotInstalledError, evaluate_with_harness, metrics_table


def harness(
    model: str,
    tasks: str,
    include_path: str | None = None,
    tokenizer: str | None = None,
    batch_size: int | str = 8,
    limit: int | float | None = None,
    device: str | None = None,
    num_fewshot: int | None = None,
    output: str | None = None,
) -> dict[str, dict[str, float]]:
    """Score an exported student (or any causal LM folder or hub name) on lm-evaluation-harness tasks.

    Args:
        model: the exported model folder (or a hub name).
        tasks: comma-separated task names or task YAML paths, e.g. ``hellaswag,arc_easy``.
        include_path: a folder of your own task YAMLs.
        tokenizer: a tokenizer name or folder; by default the model folder's.
        batch_size: per forward pass, or ``auto``.
        limit: examples per task (a count, or a fraction below 1), for smoke tests.
        device: ``cuda``, ``cpu``, ...; by default the GPU when there is one.
        num_fewshot: in-context examples per prompt, overriding the tasks' own.
        output: a JSON file to write the metrics to.
    """
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    metrics = evaluate_with_harness(
        model,
        names,
        tokenizer=tokenizer,
        include_path=include_path,
        batch_size=batch_size,
        limit=limit,
        device=device,
        num_fewshot=num_fewshot,
    )
    if output is not None:
        record = {
            "model": model,
            "tasks": names,
            "num_fewshot": num_fewshot,
            "limit": limit,
            "results": metrics,
        }
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(record, indent=2) + "\n")
    return metrics


def harness_main(args: list[str]) -> None:
    """``lightning-kd harness --model DIR --tasks a,b [--include_path DIR] [--output FILE] ...``: prints one line
    per task and metric, and writes them as JSON when ``--output`` is given."""
    from jsonargparse import CLI

    try:
        metrics = CLI(harness, args=args, as_positional=False, prog="lightning-kd harness")
    except (HarnessNotInstalledError, ValueError) as error:
        raise SystemExit(f"lightning-kd harness: {error}") from None
    print(metrics_table(metrics))
