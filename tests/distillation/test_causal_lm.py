"""DistillationModule(task="causal-lm") on decoders: the next-token terms against the full-logit formulas and the
model's own loss, perplexity with its gap, HomoDistil shrinking a Llama while it distils, and the export."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from kd_helpers import ResumableLoader, StopAt, quiet_trainer
from tiny_models import make_model
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lightning_kd import DistillationModule, PruningCallback
from lightning_kd.objective import token_divergence
from lightning_kd.pruning import unit_counts

pytestmark = pytest.mark.usefixtures("one_thread")


def causal_batch(vocab: int = 97, seed: int = 0, batch: int = 4, length: int = 12) -> dict[str, torch.Tensor]:
    """What PretrainingDataModule(lm="causal") yields: labels are the input ids (the model shifts), -100 at
    padding (the end of every other row)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[::2, -4:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class CausalBatches(L.LightningDataModule):
    def __init__(self, count: int = 4, vocab: int = 97) -> None:
        super().__init__()
        self.batches = [causal_batch(vocab, seed=i) for i in range(count)]

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(self.batches)  # resumes mid-epoch where a checkpoint stopped

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.batches[:2], batch_size=None)


def _perturbed_copy(teacher: torch.nn.Module) -> torch.nn.Module:
    student = make_model("llama", seed=0)
    torch.manual_seed(7)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return student


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd", "topk"])
def test_the_tokens_term_is_the_divergence_of_the_full_logits_at_every_real_position(loss: str) -> None:
    teacher = make_model("llama")
    options = {"top_k": 5} if loss == "topk" else {}
    module = DistillationModule(
        teacher,
        _perturbed_copy(teacher),
        task="causal-lm",
        objective=[{"term": "tokens", "loss": loss, "chunk_size": 7, **options}],
    )
    batch = module.prepare_batch(causal_batch())
    teacher_features, student_features = module.teacher_features(batch), module.student_features(batch)
    assert teacher_features.logits is None  # never the whole batch's vocabulary logits
    value = module.losses(teacher_features, student_features, batch)[1][f"tokens_{loss}"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        real = batch["attention_mask"].bool()
        full_t, full_s = teacher(**inputs).logits[real], module.student(**inputs).logits[real]
    expected = token_divergence(full_t, full_s, loss, **options).mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5) and value.item() > 1e-4


def test_the_task_term_is_the_models_own_shifted_loss_and_a_copy_starts_at_zero() -> None:
    teacher = make_model("llama")
    module = DistillationModule(
        teacher,
        {"init": "copy"},
        task="causal-lm",
        objective=[{"term": "tokens"}, {"term": "task", "chunk_size": 5}],
    )
    batch = module.prepare_batch(causal_batch())
    terms = module.losses(module.teacher_features(batch), module.student_features(batch), batch)[1]
    assert terms["tokens_forward_kl"].abs().item() < 1e-6
    own = teacher(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    assert terms["task"].item() == pytest.approx(own.item(), rel=1e-5)


def test_validation_logs_perplexity_for_both_models_and_the_gap() -> None:
    teacher = make_model("llama")
    module = DistillationModule(teacher, _perturbed_copy(teacher), task="causal-lm")
    data = CausalBatches()
    quiet_trainer(max_steps=1).validate(module, data)
    logged = quiet_trainer(max_steps=1)
    metrics = logged.validate(module, data)[0]
    with torch.no_grad():  # exp of the mean over every predicted token of the set
        nll, tokens = 0.0, 0
        for batch in data.batches[:2]:
            count = int((batch["labels"][:, 1:] != -100).sum())
            nll += teacher(**batch).loss.item() * count
            tokens += count
    assert metrics["val/perplexity/teacher"] == pytest.approx(
        float(torch.tensor(nll / tokens).exp()), rel=1e-4
    )
    gap = metrics["val/perplexity/student"] - metrics["val/perplexity/teacher"]
    assert metrics["val/perplexity/gap"] == pytest.approx(gap, rel=1e-4) and gap > 0


def test_vocabularies_padded_differently_are_compared_over_the_rows_both_have() -> None:
    torch.manual_seed(0)
    config = dict(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    teacher = LlamaForCausalLM(LlamaConfig(vocab_size=104, **config)).eval()
    student = LlamaForCausalLM(LlamaConfig(vocab_size=97, **config)).eval()
    module = DistillationModule(teacher, student, task="causal-lm")
    batch = module.prepare_batch(causal_batch(vocab=97))
    value = module.losses(module.teacher_features(batch), module.student_features(batch), batch)[1]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        real = batch["attention_mask"].bool()
        t, s = teacher(**inputs).logits[real][:, :97], student(**inputs).logits[real]
    assert value["tokens_forward_kl"].item() == pytest.approx(
        token_divergence(t, s, "forward_kl").mean().item(), rel=1e-5
    )
    masked_lm = make_model("bert")
    with pytest.raises(ValueError, match="vocabularies differ"):
        DistillationModule(teacher, masked_lm, task="causal-lm")


def test_masked_lm_data_and_the_full_logits_term_are_refused_with_the_fix() -> None:
    from lightning_kd import PretrainingDataModule

    teacher = make_model("llama")
    with pytest.raises(ValueError, match="use the 'tokens' term"):
        DistillationModule(teacher, {"init": "copy"}, task="causal-lm", objective=[{"term": "logits"}])
    from lightning_kd.distillation.data_checks import check_task_fits_data

    data = PretrainingDataModule(tokenizer="sentence-transformers/all-MiniLM-L6-v2", sources=["docstrings"])
    with pytest.raises(ValueError, match="PretrainingDataModule\\(lm='causal'\\)"):
        check_task_fits_data("causal-lm", data)  # what setup checks before the first step
    with pytest.raises(ValueError, match="use task: causal-lm"):
        check_task_fits_data(
            "masked-lm", PretrainingDataModule(tokenizer="gpt2-like", sources=["docstrings"], lm="causal")
        )


TARGET = {"heads": 0.5, "ffn": 0.25, "hidden": 0.5}  # 2 of 4 key/value groups, 12 of 48 neurons, 16 of 32


def distil(pruning: PruningCallback, steps: int = 8, **fit: object) -> DistillationModule:
    L.seed_everything(5)
    module = DistillationModule(
        make_model("llama"),
        {"init": "copy"},
        task="causal-lm",
        objective=[
            {"term": "tokens", "chunk_size": 16},
            {"term": "hidden", "layers": "uniform"},
            {"term": "task"},
        ],
        learning_rate=1e-3,
    )
    trainer = quiet_trainer(
        max_steps=steps, callbacks=[pruning, *fit.pop("callbacks", [])], **fit.pop("trainer", {})
    )
    trainer.fit(module, CausalBatches(count=fit.pop("batches", 4)), **fit)
    module.trainer_ = trainer
    return module


def test_homodistil_shrinks_a_decoder_as_the_masks_say_and_it_exports_and_generates(tmp_path: Path) -> None:
    shrink = PruningCallback(TARGET, end_step=6, interval=2, prune_at_end=False)
    shrunk = distil(shrink)
    mask = PruningCallback(TARGET, end_step=6, interval=2, prune_at_end=False, physical=False)
    masked = distil(mask)
    assert shrink.events == mask.events and [e["step"] for e in shrink.events] == [2, 4, 6]
    counts = unit_counts(shrunk.student)
    assert counts["heads"] == [2] * 3 and counts["ffn"] == [12] * 3 and counts["hidden"] == 16
    attention = shrunk.student.model.layers[0].self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features) == (
        2 * 2 * 8,
        2 * 8,
    )  # whole groups
    mask.prune_student(masked)
    shrink.prune_student(shrunk)
    for name, value in masked.state_dict().items():
        assert torch.allclose(value, shrunk.state_dict()[name], atol=2e-6), name
    shrunk.save_student(tmp_path / "student")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert (loaded.config.num_attention_heads, loaded.config.num_key_value_heads, loaded.config.head_dim) == (
        4,
        2,
        8,
    )
    batch = causal_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    shrunk.student.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, shrunk.student(**inputs).logits, atol=1e-5)
        prompt = batch["input_ids"][1:2, :5]
        generated = loaded.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        expected = shrunk.student.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 9) and torch.equal(generated, expected)


def test_a_decoder_resumed_mid_pruning_ends_with_the_same_student(tmp_path: Path) -> None:
    def run(stop_at: int | None = None, ckpt: str | None = None) -> DistillationModule:
        pruning = PruningCallback(TARGET, start_step=1, end_step=7, interval=2)
        callbacks = [StopAt(stop_at)] if stop_at else []
        module = distil(
            pruning, callbacks=callbacks, trainer={"default_root_dir": tmp_path}, batches=3, ckpt_path=ckpt
        )
        if stop_at:
            module.trainer_.save_checkpoint(tmp_path / "mid.ckpt")
        return module

    straight = run()
    run(stop_at=4)  # one batch into the second epoch of three batches, after the first event
    resumed = run(ckpt=str(tmp_path / "mid.ckpt"))
    assert straight.student.state_dict().keys() == resumed.student.state_dict().keys()
    for name, value in straight.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[name]), name


def test_the_snippet_in_docs_decoders_builds_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/decoders.md's first example, run as written, with a tiny Llama standing in for the hub's."""
    import re

    from lightning_kd import hub

    def stand_in(loader: object, name: object, what: str, **kwargs: object) -> object:
        assert (name, what) == ("meta-llama/Llama-3.2-1B", "model")
        return make_model("llama")

    monkeypatch.setattr(hub, "_load", stand_in)
    text = (Path(__file__).resolve().parents[2] / "docs" / "decoders.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 (the documented code itself)
    assert scope["module"].hparams.task == "causal-lm" and scope["data"].lm == "causal"
    assert scope["pruning"].target == {"hidden": 1536, "ffn": 6144}
    assert [type(t).__name__ for t in scope["module"].objective.terms.values()] == [
        "NextTokenDistillation",
        "TaskLoss",
    ]
