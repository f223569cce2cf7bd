"""The ``lightning-kd`` command: Lightning's CLI over lightning-kd's modules and DataModules, plus ``prepare`` and
``harness`` (lm-evaluation-harness on an exported model).

This file stays free of torch, Lightning and transformers, so ``lightning-kd``, ``lightning-kd --help`` and
``lightning-kd --version`` answer at once; a subcommand imports what it runs.
"""

from __future__ import annotations

import os
import sys

SUBCOMMANDS = {
    "fit": "train a recipe: distil, prune while distilling (HomoDistil), TED stages, or fine-tune",
    "validate": "evaluate a checkpoint on the validation sets (task metrics, teacher-student gap)",
    "test": "evaluate a checkpoint on the test sets",
    "predict": "write predictions (for a GLUE task: the submission folder)",
    "prepare": "tokenise corpora once into LitData shards for pre-training distillation",
    "harness": "score an exported decoder on lm-evaluation-harness tasks (the optional harness extra)",
}

HELP = """usage: lightning-kd <subcommand> [options]

lightning-kd {version}: knowledge distillation and structured pruning of transformers, as PyTorch Lightning parts.

subcommands:
{commands}

Each Trainer subcommand takes a YAML recipe and dotted overrides, e.g.
  lightning-kd fit --config experiments/demo.yaml --trainer.max_steps 500
  lightning-kd prepare --output data/wiki --tokenizer bert-base-uncased
  lightning-kd harness --model runs/student --tasks hellaswag,arc_easy
Recipes: the experiments/ folder of the repository (one folder per paper, plus tiny ones for a laptop CPU).
`lightning-kd <subcommand> --help` lists that subcommand's options.
"""


def usage() -> str:
    from lightning_kd import __version__

    commands = "\n".join(f"  {name:10s}{line}" for name, line in SUBCOMMANDS.items())
    return HELP.format(version=__version__, commands=commands)


def main(args: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return
    if argv[0] in ("-V", "--version"):
        from lightning_kd import __version__

        print(f"lightning-kd {__version__}")
        return
    if argv[0] not in SUBCOMMANDS and not argv[0].startswith("-"):
        raise SystemExit(
            f"lightning-kd: unknown subcommand {argv[0]!r}; choose one of {', '.join(SUBCOMMANDS)} "
            "(`lightning-kd --help` says what each does)."
        )
    # Tokenizers' own thread pool fights dataloader workers for the same cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv[0] == "prepare":
        from lightning_kd.cli.prepare import prepare_main

        prepare_main(argv[1:])
        return
    if argv[0] == "harness":
        from lightning_kd.cli.harness import harness_main

        harness_main(argv[1:])
        return
    from lightning_kd.cli.app import DistillationCLI

    # From the console script, LightningCLI reads sys.argv itself (handing it over too makes Lightning warn that
    # arguments were given twice); from Python, the arguments given.
    DistillationCLI(args=None if args is None else argv)
