"""What the SLURM test jobs run: a tiny teacher, tokenizer and corpus on disk, and the recipe that names them.

Every job of the tests uses the same recipe (same seed, data, schedule and world size of two), so their
students must come out identical whatever the node layout, and whether or not the job was requeued.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

WORDS = (
    "the a one two of and to in is was for on with as by at from it this that student teacher model "
    "layer head neuron width prune distil learn step node rank cluster job queue signal resume check "
    "point small large fast slow quiet brown fox jumps over lazy dog river mountain"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

MAX_STEPS = 16
PRUNE_END = 12  # pruning events at steps 2, 4, ..., 12; steps 13-16 train the pruned-width student
PRUNE_INTERVAL = 2
TARGET = {"hidden": 0.5, "heads": 0.5, "ffn": 0.5}


def write_tokenizer(folder: Path) -> Path:
    """A WordPiece tokenizer over WORDS: a few dozen ids keep the teacher's embeddings and MLM head tiny."""
    vocab = {token: index for index, token in enumerate(SPECIAL + WORDS)}
    BertTokenizerFast(vocab=vocab, do_lower_case=True).save_pretrained(folder)
    return folder


def write_teacher(folder: Path, vocab_size: int) -> Path:
    # dropout 0: a resumed run then needs no RNG state to match one that never stopped
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(folder)
    return folder


def write_corpus(path: Path, documents: int = 400) -> Path:
    lines = []
    for i in range(documents):
        length = 8 + i % 23
        lines.append(" ".join(WORDS[(i * 7 + k * (1 + i % 5)) % len(WORDS)] for k in range(length)))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_assets(root: Path) -> dict[str, Path]:
    """Teacher, tokenizer and corpus under ``root``: what a job needs besides its recipe."""
    tokenizer = write_tokenizer(root / "tokenizer")
    vocab_size = len(BertTokenizerFast.from_pretrained(tokenizer))
    return {
        "tokenizer": tokenizer,
        "teacher": write_teacher(root / "teacher", vocab_size),
        "corpus": write_corpus(root / "corpus.txt"),
    }


def recipe(
    assets: dict[str, Path],
    out: Path,
    hold_at: list[int] | None = None,
    num_workers: int = 0,
    pace: float = 0.0,
) -> dict[str, Any]:
    """HomoDistil on the tiny teacher, DDP over gloo on CPU. ``out`` receives the export and the rank records.

    ``hold_at[n]`` is the step where attempt ``n`` of the job holds (see ``slurm_probe.HoldAt``); ``pace``
    makes every step of the first attempt last at least that many seconds (``slurm_probe.Pace``), so a signal
    lands mid-run.
    ``trainer.devices``/``num_nodes`` are left for the sbatch script to set from SLURM's variables.
    """
    callbacks: list[dict[str, Any]] = [
        {
            "class_path": "lightning_kd.PruningCallback",
            "init_args": {
                "target": TARGET,
                "end_step": PRUNE_END,
                "interval": PRUNE_INTERVAL,
                "export_dir": str(out / "student"),
            },
        },
        {"class_path": "slurm_probe.RankRecord", "init_args": {"out_dir": str(out)}},
    ]
    if pace:
        callbacks.append({"class_path": "slurm_probe.Pace", "init_args": {"seconds": pace}})
    if hold_at is not None:
        callbacks.append(
            {"class_path": "slurm_probe.HoldAt", "init_args": {"steps": hold_at, "out_dir": str(out)}}
        )
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "strategy": "ddp",
            "max_steps": MAX_STEPS,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "callbacks": callbacks,
        },
        "model": {
            "class_path": "lightning_kd.DistillationModule",
            "init_args": {
                "teacher": str(assets["teacher"]),
                "student": {"init": "copy"},
                "task": "masked-lm",
                "objective": [{"term": "logits"}, {"term": "hidden"}, {"term": "task"}],
                "learning_rate": 1.0e-3,
            },
        },
        "data": {
            "class_path": "lightning_kd.PretrainingDataModule",
            "init_args": {
                "tokenizer": str(assets["tokenizer"]),
                "sources": [str(assets["corpus"])],
                "max_length": 32,
                "batch_size": 4,
                "num_workers": num_workers,
            },
        },
    }


def write_recipe(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def start_steps(out: Path, rank: int = 0) -> dict[int, int]:
    """Attempt -> the global step that attempt of the job started training from, as ``rank`` saw it."""
    found = {}
    for path in out.glob(f"start-rank{rank}-attempt*.json"):
        found[int(path.stem.rsplit("attempt", 1)[1])] = json.loads(path.read_text())["step"]
    return found


def load_records(out: Path, attempt: int = 0) -> list[dict[str, Any]]:
    """The rank records of one attempt, by rank."""
    paths = sorted(out.glob(f"rank*-attempt{attempt}.pt"))
    return [torch.load(p, weights_only=False) for p in paths]
