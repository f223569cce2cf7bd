"""FineTuningModule(task="causal-lm"): a decoder trained from a config with its own next-token loss, perplexity over
the whole validation text, and an export that AutoModelForCausalLM loads; the refusals name the fix."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from kd_helpers import quiet_trainer
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_kd import FineTuningModule, PretrainingDataModule
from lightning_kd.datamodules.docstrings_tokenizer import DOCSTRINGS_TOKENIZER

pytestmark = pytest.mark.usefixtures("one_thread")

MINILM = "sentence-transformers/all-MiniLM-L6-v2"  # a masked LM's tokenizer, packaged offline
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards box jovial zebras near rivers".split()


def write_lines(path: Path, count: int, first: int = 0) -> None:
    """Numbered documents of varied length, one per line."""
    lines = [
        f"document {i} " + " ".join(WORDS[(i * 5 + k) % len(WORDS)] for k in range(8 + i % 9))
        for i in range(first, first + count)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


TINY_LLAMA = dict(
    model_type="llama",
    vocab_size=1024,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)


def causal_data(tmp_path: Path, **options: object) -> PretrainingDataModule:
    write_lines(tmp_path / "train.txt", 40)
    write_lines(tmp_path / "val.txt", 20, first=500)
    return PretrainingDataModule(
        DOCSTRINGS_TOKENIZER,
        sources=[str(tmp_path / "train.txt")],
        val_sources=[str(tmp_path / "val.txt")],
        lm="causal",
        **{"max_length": 32, "batch_size": 4, **options},
    )


def test_a_model_declared_by_its_config_is_fresh_of_that_shape_and_drawn_from_the_seed() -> None:
    torch.manual_seed(3)
    first = FineTuningModule(TINY_LLAMA, task="causal-lm").model
    torch.manual_seed(3)
    second = FineTuningModule(TINY_LLAMA, task="causal-lm").model
    assert type(first).__name__ == "LlamaForCausalLM" and first.config.hidden_size == 16
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))
    with pytest.raises(ValueError, match="needs model_type"):
        FineTuningModule({k: v for k, v in TINY_LLAMA.items() if k != "model_type"}, task="causal-lm")


def test_validation_logs_the_perplexity_of_every_predicted_token_of_the_set(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = FineTuningModule(TINY_LLAMA, task="causal-lm")
    data = causal_data(tmp_path, batch_size=3)  # batches of unequal real tokens: the last one is short
    metrics = quiet_trainer().validate(module, data)[0]
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for batch in data.val_dataloader():
            count = int((batch["labels"][:, 1:] != -100).sum())
            nll += module.model(**batch).loss.item() * count  # the model's own (shifted) loss
            tokens += count
    assert metrics["val/perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    assert 500 < metrics["val/perplexity"] < 2000  # an untrained model: about the vocabulary's 1024


def test_it_learns_from_its_own_loss_and_exports_a_folder_that_generates(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = FineTuningModule(
        TINY_LLAMA, task="causal-lm", learning_rate=1e-2, export_dir=str(tmp_path / "lm")
    )
    data = causal_data(tmp_path)
    before = quiet_trainer().validate(module, data)[0]["val/perplexity"]
    quiet_trainer(max_steps=30, val_check_interval=30, check_val_every_n_epoch=None).fit(module, data)
    assert module.last_metrics["val/perplexity"] < before / 4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "lm")
    prompt = tokenizer("document 7 the quick", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 5
    card = (tmp_path / "lm" / "README.md").read_text()
    assert (
        "trained from scratch on causal-lm (a fresh llama model)" in card and "AutoModelForCausalLM" in card
    )
    assert "from the teacher" not in card and "base_model" not in card


def test_masked_lm_data_and_predict_are_refused_with_the_fix(tmp_path: Path) -> None:
    bert_sized = FineTuningModule(
        {**TINY_LLAMA, "vocab_size": 30522}, task="causal-lm"
    )  # MiniLM's vocabulary
    masked = PretrainingDataModule(MINILM, sources=["docstrings"], max_length=32)
    with pytest.raises(ValueError, match=r"use PretrainingDataModule\(lm='causal'\)"):
        quiet_trainer(max_steps=1).fit(bert_sized, masked)
    module = FineTuningModule(TINY_LLAMA, task="causal-lm")
    batch = next(iter(causal_data(tmp_path).val_dataloader()))
    with pytest.raises(ValueError, match="generate text with the exported folder"):
        quiet_trainer().predict(module, DataLoader([batch], batch_size=None))
    with pytest.raises(ValueError, match="causal-lm \\(next-token prediction on text\\)"):
        FineTuningModule(TINY_LLAMA, task="causal")
