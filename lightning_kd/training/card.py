"""The model card (``README.md``) written next to an exported model: where it came from, how big and fast it
is, how well it does, and how to load it, for people who never installed lightning-kd."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@torch.no_grad()
def forward_ms(
    models: Mapping[str, nn.Module], batch: Mapping[str, torch.Tensor], repeats: int = 5
) -> dict[str, float]:
    """Fastest of ``repeats`` forward passes of each model on ``batch`` in ms, in eval mode, the models taking
    turns; the fastest, as timeit reports, because work sharing the machine only ever adds time. Each model's
    mode is restored."""
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    times: dict[str, list[float]] = {name: [] for name in models}
    modes = {name: model.training for name, model in models.items()}
    try:
        for model in models.values():
            model.eval()
            model(**{k: v.to(next(model.parameters()).device) for k, v in inputs.items()})  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                device = next(model.parameters()).device
                moved = {k: v.to(device) for k, v in inputs.items()}
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                model(**moved)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append((time.perf_counter() - start) * 1000.0)
    finally:
        for name, model in models.items():
            model.train(modes[name])
    return {name: min(values) for name, values in times.items()}


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"


def write_model_card(
    path: str | os.PathLike,
    *,
    teacher: str,
    method: str,
    model_class: str,
    parameters: int,
    plain_parameters: int,
    teacher_parameters: int | None = None,
    recipe: str | None = None,
    speed: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    discrepancy: Mapping[str, tuple[float, float]] | None = None,
    label_names: list[str] | None = None,
    made_with: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``README.md`` (with Hugging Face metadata) into the exported folder ``path``; returns its path.

    ``speed``: ``{"teacher_ms", "student_ms", "batch": "B x L", "device"}``; ``metrics``: task metrics by name
    (student, teacher and gap alike); ``discrepancy``: ``{name: (at the start, at the end)}``; ``made_with``: the
    record a checkpoint keeps of the task, head, tokenizer and teacher (with its fingerprint), written as JSON.
    """
    folder = Path(path)
    padded = plain_parameters != parameters
    lines = ["---", "library_name: transformers", "tags:", "- knowledge-distillation", "- lightning-kd"]
    if teacher and not Path(teacher).exists():
        lines.append(f"base_model: {teacher}")
    lines += ["---", "", f"# {folder.resolve().name}", ""]
    # a model trained from scratch (FineTuningModule from a config) had no teacher to name
    lines.append(
        f"Made with lightning-kd from the teacher `{teacher}`." if teacher else "Made with lightning-kd."
    )
    lines += ["", "## How it was made", "", f"- method: {method}"]
    if recipe:
        lines.append(f"- recipe: `{recipe}`")
    lines += ["", "## Size", ""]
    size = f"- parameters: {_millions(parameters)}"
    if teacher_parameters:
        size += f" ({parameters / teacher_parameters:.0%} of the teacher's {_millions(teacher_parameters)})"
    lines.append(size)
    if padded:
        lines.append(
            f"- loaded with plain transformers: {_millions(plain_parameters)}. Its layers were pruned to different "
            "widths, which one config cannot express, so the narrower ones are zero-padded (same outputs, "
            "larger memory). `lightning_kd.load_pruned` loads it at its true size."
        )
    if speed:
        lines += [
            "",
            "## Speed",
            "",
            f"Forward pass on a {speed['batch']} batch ({speed['device']}), measured at export, the two "
            "models taking turns (fastest of 5 each):",
            "",
            "| model | ms | speed-up |",
            "| --- | --- | --- |",
            f"| teacher | {speed['teacher_ms']:.1f} | 1.00x |",
            f"| this model | {speed['student_ms']:.1f} | {speed['teacher_ms'] / speed['student_ms']:.2f}x |",
        ]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items())]
    if discrepancy:
        lines += [
            "",
            "## Teacher-student discrepancy (lower is closer)",
            "",
            "| measure | start | end |",
            "| --- | --- | --- |",
        ]
        lines += [
            f"| {name} | {start:.4f} | {end:.4f} |" for name, (start, end) in sorted(discrepancy.items())
        ]
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        f"from transformers import {model_class}, AutoTokenizer",
        "",
        f'model = {model_class}.from_pretrained("{folder.name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{folder.name}")',
        "```",
    ]
    if padded:
        lines += [
            "",
            "At its true size:",
            "",
            "```python",
            "from lightning_kd import load_pruned",
            "",
            f'model = load_pruned("{folder.name}", {model_class})',
            "```",
        ]
    if label_names:
        lines += ["", f"Labels, in id order: {', '.join(f'`{n}`' for n in label_names)}."]
    if made_with:
        # what a checkpoint records, so an exported folder also says which teacher weights and vocabulary it
        # was made with (two teachers of one name and shape differ only in their fingerprints)
        lines += ["", "## Made with", "", "```json", json.dumps(made_with, indent=2, default=str), "```"]
    card = folder / "README.md"
    card.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return card


def auto_class_name(model: nn.Module) -> str:
    """The ``transformers`` Auto class that loads ``model``'s folder with its head."""
    from lightning_kd.models.layers import is_classifier, is_question_answering

    if is_question_answering(model):
        return "AutoModelForQuestionAnswering"
    if is_classifier(model):
        return "AutoModelForSequenceClassification"
    if type(model).__name__.endswith(
        "ForCausalLM"
    ):  # a decoder's LM head predicts the next token, not a mask
        return "AutoModelForCausalLM"
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output) and get_output() is not None:
        return "AutoModelForMaskedLM"
    return "AutoModel"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def export_sizes_line(parameters: int, plain_parameters: int) -> str:
    """Both sizes of an export, in one line: the true one, and what plain transformers loads."""
    if parameters == plain_parameters:
        return f"exported: {_millions(parameters)} parameters, as plain transformers loads it"
    return (
        f"exported: {_millions(parameters)} parameters; plain transformers loads {_millions(plain_parameters)} "
        "(per-layer widths zero-padded to the widest layer; lightning_kd.load_pruned loads the true size)"
    )
