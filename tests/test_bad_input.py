"""Bad input found by trying the library as a new user: each is refused early, naming the problem and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from kd_helpers import FixedBatches, make_batch, quiet_trainer, tiny_bert_config
from torch.utils.data import DataLoader
from transformers import BertForMaskedLM, BertForSequenceClassification, RobertaConfig, RobertaForMaskedLM

from lightning_kd import DistillationModule, PruningCallback, hub
from lightning_kd.datamodules.glue import get_task
from lightning_kd.models import max_sequence_length
from lightning_kd.module import complete_batch
from lightning_kd.ted_filters import load_filters


class LongData(FixedBatches):
    max_length = 128  # the tiny teacher has 64 positions


class MNLIData(FixedBatches):
    task = get_task("mnli")


def test_data_longer_than_the_position_embeddings_is_refused_before_training(teacher: BertForMaskedLM) -> None:
    module = DistillationModule(teacher, {"init": "layers", "num_layers": 2})
    trainer = quiet_trainer(max_steps=2)
    with pytest.raises(ValueError, match="max_length=128 is longer than the teacher's 64 positions.*at most 64"):
        trainer.fit(module, LongData())
    assert trainer.global_step == 0
    # RoBERTa's positions start after its padding index
    roberta = RobertaForMaskedLM(RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=8,
                                               max_position_embeddings=66, pad_token_id=1))
    assert max_sequence_length(roberta) == 64


def test_classifier_with_another_label_count_than_the_task_is_refused(teacher: BertForMaskedLM) -> None:
    torch.manual_seed(0)
    two = BertForSequenceClassification(tiny_bert_config(num_labels=2)).eval()
    module = DistillationModule(two, {"init": "copy"}, task="sequence-classification")
    with pytest.raises(ValueError, match="teacher's classifier predicts 2 labels, but task 'mnli' has 3.*"
                                         "num_labels=3"):
        quiet_trainer(max_steps=1).fit(module, MNLIData())


def test_batch_without_attention_mask_means_all_tokens_and_without_input_ids_is_named(
    teacher: BertForMaskedLM,
) -> None:
    batch = make_batch()
    full = {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}
    module = DistillationModule(teacher, {"init": "layers", "num_layers": 2}, objective=[
        {"term": "hidden"}, {"term": "logits"}, {"term": "relations"}])
    module.student.eval()
    bare = {k: v for k, v in batch.items() if k != "attention_mask"}
    with torch.no_grad():
        implicit = module.losses(module.teacher_features(complete_batch(bare)), module.student_features(
            complete_batch(bare)), complete_batch(bare))[0]
        explicit = module.losses(module.teacher_features(full), module.student_features(full), full)[0]
    assert torch.equal(implicit, explicit)
    quiet_trainer(max_steps=1).fit(module, DataLoader([bare], batch_size=None))
    with pytest.raises(KeyError, match="a batch needs 'input_ids'.*\\['labels'\\]"):
        complete_batch({"labels": batch["labels"]})


def test_warmup_longer_than_the_run_is_refused(teacher: BertForMaskedLM) -> None:
    module = DistillationModule(teacher, {"init": "layers", "num_layers": 2}, warmup_steps=10)
    with pytest.raises(ValueError, match="warm-up \\(10 steps\\) is longer than the run \\(4 optimizer steps"):
        quiet_trainer(max_steps=4).fit(module, FixedBatches())


@pytest.mark.parametrize(("objective", "message"), [
    ([{"term": "hidden", "layers": [2, 4]}], "layer map entry 2 of \\[2, 4\\] must be a \\[student_layer, "
                                             "teacher_layer\\] pair of integers"),
    ([{"term": "hidden", "layers": [["1", "2"]]}], "pair of integers"),
    ([{"term": "hidden", "weight": "high"}], "weight 'high': a weight is a number"),
])
def test_objective_typos_are_named(teacher: BertForMaskedLM, objective: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DistillationModule(teacher, {"init": "layers", "num_layers": 2}, objective=objective)


@pytest.mark.parametrize(("student", "message"), [
    ({"init": "layers", "num_layers": "2"}, "num_layers must be a whole number, got '2' \\(str\\)"),
    ({"init": "layers", "layers": "0, 2"}, "layers must be a list of teacher block indices"),
    ({"init": "config", "config": {"num_hidden_layers": 2}, "hidden_size": 8.0}, "hidden_size must be a whole"),
])
def test_student_spec_typos_are_named(teacher: BertForMaskedLM, student: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DistillationModule(teacher, student)


def test_pruning_target_as_a_string_is_named() -> None:
    with pytest.raises(ValueError, match="target heads='0.5' must be a number"):
        PruningCallback({"heads": "0.5"})


def test_corrupt_ted_filter_file_is_named_without_suggesting_unsafe_loading(tmp_path: Path) -> None:
    broken = tmp_path / "teacher.pt"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="teacher.pt cannot be read as TED filters.*Run stage I again") as caught:
        load_filters(broken, side="teacher")
    assert "weights_only" not in str(caught.value)


def test_unreachable_hub_fails_at_once_from_the_cache_only(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    class Loader:
        @staticmethod
        def from_pretrained(source: str, **kwargs: Any) -> None:
            seen.update(kwargs)
            raise OSError(f"{source} is not in the cache")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    for name in hub.PROXY_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    hub.hub_reachable.cache_clear()
    try:
        with pytest.raises(OSError, match="(?s)could not load the model 'org/model'.*cannot be reached"):
            hub._load(Loader, "org/model", "model")
        assert seen == {"local_files_only": True}
        monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
        hub.hub_reachable.cache_clear()
        assert hub.hub_reachable()  # behind a proxy, a direct probe proves nothing
    finally:
        hub.hub_reachable.cache_clear()
