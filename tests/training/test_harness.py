"""The lm-evaluation-harness bridge on a local multiple-choice task (a JSON Lines file, nothing downloaded): the
harness's accuracy of an exported tiny Llama, from its folder, in memory and through ``lightning-kd harness``,
equals the accuracy worked out by hand from the model's own log-likelihood of each choice."""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from lightning_kd.cli import main
from lightning_kd.training.harness import (
    HarnessNotInstalledError,
    builtin_tasks_needed,
    evaluate_with_harness,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "datamodules"))
from squad_tokenizers import decoder_style_tokenizer  # noqa: E402

TASK = "kd_tiny_choice"
BEST = "kd_tiny_choice_best"
QUESTIONS = [
    ("The sky on a clear day is", ["blue", "green", "loud"]),
    ("Two plus two is", ["four", "five"]),
    ("A cat says", ["woof", "meow", "moo"]),
    ("Water is", ["dry", "wet", "red", "slow"]),
    ("The opposite of hot is", ["cold", "warm"]),
    ("Fish live in", ["trees", "water", "sand"]),
    ("The sun rises in the", ["east", "west"]),
    ("Snow is", ["black", "white", "heavy"]),
]
# In TASK the gold answer is the model's own best choice except at these examples, so the expected accuracy is
# known and neither 0 nor 1: 5/8 over all eight, 3/4 over the first four. In BEST it is always the model's best
# choice: 1.0, which another model (or other tokens) would reach only by agreeing on all eight.
WRONG_AT = {1, 4, 6}

# lm_eval's task format: the prompt, then its target delimiter (a space), then each choice, scored by summed
# log-likelihood; ``acc`` is whether the best-scored choice is the gold one.
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@dataclass
class Exported:
    folder: Path
    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerBase
    tasks: Path
    answers: list[int]
    best: list[int]


def choice_loglikelihood(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, prompt: str, choice: str
) -> float:
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(f"{prompt} {choice}")["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    # The token at position t is predicted by the logits at t - 1.
    return sum(logprobs[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids)))


def hand_accuracy(exported: Exported, count: int | None = None) -> float:
    pairs = list(zip(exported.best, exported.answers, strict=True))[:count]
    return sum(best == answer for best, answer in pairs) / len(pairs)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    root = tmp_path_factory.mktemp("harness")
    words = [f"{prompt} {choice}" for prompt, choices in QUESTIONS for choice in choices]
    tokenizer = decoder_style_tokenizer(words)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    folder = root / "student"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    best, answers = [], []
    for i, (prompt, choices) in enumerate(QUESTIONS):
        scores = [choice_loglikelihood(model, tokenizer, prompt, c) for c in choices]
        best.append(int(np.argmax(scores)))
        answers.append((best[-1] + 1) % len(choices) if i in WRONG_AT else best[-1])
    tasks = root / "tasks"
    tasks.mkdir()
    for name, gold in ((TASK, answers), (BEST, best)):
        rows = [{"question": p, "choices": c, "answer": a} for (p, c), a in zip(QUESTIONS, gold, strict=True)]
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (tasks / f"{name}.yaml").write_text(TASK_YAML.format(task=name, data=tasks / f"{name}.jsonl"))
    return Exported(folder, model, tokenizer, tasks, answers, best)


def test_the_harness_scores_the_exported_folder_as_its_own_loglikelihoods_do(exported: Exported) -> None:
    assert hand_accuracy(exported) == 5 / 8
    metrics = evaluate_with_harness(
        exported.folder, [TASK, BEST], include_path=exported.tasks, device="cpu", batch_size=4
    )
    assert set(metrics) == {TASK, BEST}
    assert metrics[TASK]["acc"] == pytest.approx(hand_accuracy(exported))
    assert metrics[BEST]["acc"] == 1.0
    assert metrics[TASK]["acc_stderr"] > 0


def test_a_model_in_memory_is_scored_and_left_as_it_was(exported: Exported) -> None:
    model, tokenizer = exported.model, exported.tokenizer
    model.train()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    expected_draws = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    try:
        metrics = evaluate_with_harness(model, [TASK, BEST], tokenizer=tokenizer, include_path=exported.tasks)
        assert metrics[TASK]["acc"] == pytest.approx(hand_accuracy(exported))
        assert metrics[BEST]["acc"] == 1.0
        # The harness seeds the global generators, sets a pad token and switches the model to eval mode.
        assert model.training
        assert tokenizer.pad_token is None
        assert torch.equal(torch.rand(3), expected_draws[0])
        assert (random.random(), np.random.rand()) == expected_draws[1:]
    finally:
        model.eval()


def test_the_command_prints_a_table_and_writes_json(
    exported: Exported, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "results" / "harness.json"
    task_file = exported.tasks / f"{TASK}.yaml"
    main(
        ["harness", "--model", str(exported.folder), "--tasks", str(task_file), "--limit", "4"]
        + ["--device", "cpu", "--output", str(out)]
    )
    expected = hand_accuracy(exported, count=4)
    assert expected == 3 / 4
    lines = capsys.readouterr().out.splitlines()
    assert next(line for line in lines if line.startswith("task ")).split() == [
        "task",
        "metric",
        "value",
        "stderr",
    ]
    row = next(line.split() for line in lines if line.startswith(TASK))
    assert row[1:3] == ["acc", f"{expected:.4f}"]
    record = json.loads(out.read_text())
    assert record["limit"] == 4 and record["tasks"] == [str(task_file)]
    assert record["results"][TASK]["acc"] == pytest.approx(expected)


def test_local_tasks_skip_indexing_lm_evals_collection(exported: Exported) -> None:
    local = [TASK, "kd_other"]
    assert not builtin_tasks_needed([TASK], local)
    assert not builtin_tasks_needed([str(exported.tasks / f"{TASK}.yaml")], local)
    assert builtin_tasks_needed([TASK, "hellaswag"], local)


def test_bad_input_names_the_fix(exported: Exported, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json.*folder the student was exported to"):
        evaluate_with_harness(tmp_path, [TASK], include_path=exported.tasks)
    with pytest.raises(ValueError, match="needs its tokenizer: pass tokenizer="):
        evaluate_with_harness(exported.model, [TASK], include_path=exported.tasks)
    with pytest.raises(ValueError, match="not a folder"):
        evaluate_with_harness(exported.folder, [TASK], include_path=tmp_path / "missing")


@pytest.mark.parametrize("missing", ["lm_eval", "lm_eval.models.huggingface"])
def test_without_the_extra_the_error_says_how_to_install_it(
    exported: Exported, missing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry in sys.modules makes that import fail as if the package were absent.
    monkeypatch.setitem(sys.modules, missing, None)
    with pytest.raises(HarnessNotInstalledError, match=r'pip install "lightning-kd\[harness\]"'):
        evaluate_with_harness(exported.folder, [TASK], include_path=exported.tasks)
    with pytest.raises(SystemExit, match=r'lightning-kd harness: .*pip install "lightning-kd\[harness\]"'):
        main(["harness", "--model", str(exported.folder), "--tasks", TASK])
