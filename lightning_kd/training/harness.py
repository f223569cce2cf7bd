"""Scoring an exported decoder on lm-evaluation-harness tasks (the optional ``harness`` extra): the harness's own
Hugging Face model wrapper (``HFLM``) and ``simple_evaluate``, on a folder that ``AutoModelForCausalLM`` loads or
on a model in memory, with tasks from lm_eval's collection or from local task YAMLs."""

from __future__ import annotations

import contextlib
import copy
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

INSTALL_HINT = 'pip install "lightning-kd[harness]"'


class HarnessNotInstalledError(ImportError):
    """lm-evaluation-harness, or the part of it that runs Hugging Face models, is not installed."""


def import_harness() -> tuple[Any, Any, Any]:
    """``(simple_evaluate, TaskManager, HFLM)`` from lm_eval, or an error that says how to install them."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise HarnessNotInstalledError(
            f"Evaluating with lm-evaluation-harness needs the optional package lm_eval ({error}); install it "
            f"with `{INSTALL_HINT}`."
        ) from error
    try:
        # lm_eval installs without its Hugging Face backend (accelerate); the extra pulls it in.
        from lm_eval.models.huggingface import HFLM
    except ImportError as error:
        raise HarnessNotInstalledError(
            f"lm_eval is installed but its Hugging Face model backend cannot be imported ({error}); install "
            f"it with `{INSTALL_HINT}` (lm_eval[hf] brings accelerate)."
        ) from error
    return simple_evaluate, TaskManager, HFLM


def builtin_tasks_needed(tasks: Sequence[str], local_tasks: Sequence[str]) -> bool:
    """Whether resolving ``tasks`` needs lm_eval's own collection: no when each is a task defined under the
    include path or a task YAML file. Indexing the collection (about 15,000 task files) takes seconds."""
    local = set(local_tasks)
    return not all(name in local or Path(name).is_file() for name in tasks)


def task_manager(tasks: Sequence[str], include_path: str | os.PathLike | None) -> Any:
    """lm_eval's TaskManager over ``include_path``, and over lm_eval's own collection only if ``tasks`` need it."""
    _, TaskManager, _ = import_harness()
    path = None if include_path is None else str(include_path)
    if path is not None and not Path(path).is_dir():
        raise ValueError(
            f"include_path {path!r} is not a folder; give the folder that holds your task YAML files."
        )
    local = TaskManager(include_path=path, include_defaults=False)
    if not builtin_tasks_needed(tasks, local.all_subtasks):
        return local
    return TaskManager(include_path=path)


@contextlib.contextmanager
def caller_random_state() -> Iterator[None]:
    """simple_evaluate seeds Python's, NumPy's and torch's global generators; a caller mid-training keeps its own
    streams (dropout, shuffling) as they were."""
    import numpy as np
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(
        devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
    ):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def task_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """lm_eval's ``results`` section as ``{task: {metric: value}}``: numbers only, and the ``,none`` suffix
    (no filter) dropped, so plain loglikelihood metrics read ``acc``, ``acc_stderr``, ``acc_norm``; metrics
    after a named filter keep lm_eval's ``metric,filter`` key."""
    metrics: dict[str, dict[str, float]] = {}
    for task, row in results.items():
        metrics[task] = {
            key.removesuffix(",none"): float(value)
            for key, value in row.items()
            if "," in key and isinstance(value, int | float) and not isinstance(value, bool)
        }
    return metrics


def evaluate_with_harness(
    model: str | os.PathLike | PreTrainedModel,
    tasks: Sequence[str],
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None = None,
    include_path: str | os.PathLike | None = None,
    batch_size: int | str = 8,
    limit: int | float | None = None,
    device: str | None = None,
    num_fewshot: int | None = None,
    model_args: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Score a causal LM on lm-evaluation-harness tasks and return ``{task: {metric: value}}``.

    Args:
        model: an exported folder (``lightning-kd``'s student export, or any folder or hub name
            ``AutoModelForCausalLM`` loads), or a model in memory (then ``tokenizer`` is needed; the model stays
            on its device and returns to training mode if it was in it).
        tasks: task or group names from lm_eval's collection, names defined under ``include_path``, or paths to
            task YAML files.
        tokenizer: a tokenizer, its name or folder; by default the model folder's own.
        include_path: a folder of task YAMLs (e.g. a local task whose ``dataset_path: json`` reads local
            ``data_files``). When every task is found there, lm_eval's own collection is not indexed.
        batch_size: per forward pass, or ``"auto"`` (lm_eval finds the largest that fits on the GPU).
        limit: examples per task (a count, or a fraction below 1); for smoke tests, not for reported numbers.
        device: ``"cuda"``, ``"cpu"``, ...; by default the GPU when there is one. Ignored for a model in memory.
        num_fewshot: in-context examples per prompt, overriding each task's own setting.
        model_args: further arguments of lm_eval's ``HFLM`` (``dtype``, ``max_length``, ``add_bos_token``, ...).
    """
    simple_evaluate, _, HFLM = import_harness()
    import torch

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError("No task given; name lm_eval tasks, or task YAMLs under include_path.")
    in_memory = isinstance(model, torch.nn.Module)
    if in_memory:
        if tokenizer is None:
            raise ValueError(
                "A model in memory needs its tokenizer: pass tokenizer= (the object, its name or its folder)."
            )
        pretrained: Any = model
    else:
        pretrained = os.fspath(model)
        folder = Path(pretrained)
        if folder.exists() and not (folder / "config.json").is_file():
            raise ValueError(
                f"{pretrained!r} has no config.json, so it is not a model folder; give the folder the student "
                "was exported to (it holds config.json and the weights)."
            )
    if isinstance(tokenizer, str | os.PathLike):
        tokenizer = os.fspath(tokenizer)
    elif tokenizer is not None:
        # HFLM gives a tokenizer without a pad token one and changes its padding side: work on a copy.
        tokenizer = copy.deepcopy(tokenizer)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    manager = task_manager(tasks, include_path)
    was_training = in_memory and model.training
    try:
        with caller_random_state():
            lm = HFLM(
                pretrained=pretrained,
                tokenizer=tokenizer,
                batch_size=batch_size,
                device=device,
                **dict(model_args or {}),
            )
            output = simple_evaluate(
                model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot
            )
    finally:
        if was_training:
            model.train()
    if output is None:  # a non-zero rank under accelerate: rank 0 holds the results
        return {}
    return task_metrics(output["results"])


def metrics_table(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """One line per task and metric, with its standard error when lm_eval computed one."""
    rows = [("task", "metric", "value", "stderr")]
    for task, values in metrics.items():
        for name, value in values.items():
            if name.endswith("_stderr") or "_stderr," in name:
                continue
            stderr = values.get(name.replace(",", "_stderr,", 1) if "," in name else f"{name}_stderr")
            rows.append((task, name, f"{value:.4f}", "" if stderr is None else f"{stderr:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )
