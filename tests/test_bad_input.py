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
from lightning_kd.batch import complete_batch
from lightning_kd.datamodules.glue import get_task
from lightning_kd.models import max_sequence_length
from lightning_kd.ted.filters import load_filters


class LongData(FixedBatches):
    max_length = 128  # the tiny teacher has 64 positions


class MNLIData(FixedBatches):
    task = get_task("mnli")


def test_data_longer_than_the_position_embeddings_is_refused_before_training(
    teacher: BertForMaskedLM,
) -> None:
    module = DistillationModule(teacher, {"init": "layers", "num_layers": 2})
    trainer = quiet_trainer(max_steps=2)
    with pytest.raises(
        ValueError, match="max_length=128 is longer than the teacher's 64 positions.*at most 64"
    ):
        trainer.fit(module, LongData())
    assert trainer.global_step == 0
    # RoBERTa's positions start after its padding index
    roberta = RobertaForMaskedLM(
        RobertaConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=8,
            max_position_embeddings=66,
            pad_token_id=1,
        )
    )
    assert max_sequence_length(roberta) == 64


def test_classifier_with_another_label_count_than_the_task_is_refused(teacher: BertForMaskedLM) -> None:
    torch.manual_seed(0)
    two = BertForSequenceClassification(tiny_bert_config(num_labels=2)).eval()
    module = DistillationModule(two, {"init": "copy"}, task="sequence-classification")
    with pytest.raises(
        ValueError, match="teacher's classifier predicts 2 labels, but task 'mnli' has 3.*num_labels=3"
    ):
        quiet_trainer(max_steps=1).fit(module, MNLIData())


def test_batch_without_attention_mask_means_all_tokens_and_without_input_ids_is_named(
    teacher: BertForMaskedLM,
) -> None:
    batch = make_batch()
    full = {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}
    module = DistillationModule(
        teacher,
        {"init": "layers", "num_layers": 2},
        objective=[{"term": "hidden"}, {"term": "logits"}, {"term": "relations"}],
    )
    module.student.eval()
    bare = {k: v for k, v in batch.items() if k != "attention_mask"}
    with torch.no_grad():
        implicit = module.losses(
            module.teacher_features(complete_batch(bare)),
            module.student_features(complete_batch(bare)),
            complete_batch(bare),
        )[0]
        explicit = module.losses(module.teacher_features(full), module.student_features(full), full)[0]
    assert torch.equal(implicit, explicit)
    quiet_trainer(max_steps=1).fit(module, DataLoader([bare], batch_size=None))
    with pytest.raises(KeyError, match="a batch needs 'input_ids'.*\\['labels'\\]"):
        complete_batch({"labels": batch["labels"]})


def test_warmup_longer_than_the_run_is_refused(teacher: BertForMaskedLM) -> None:
    module = DistillationModule(teacher, {"init": "layers", "num_layers": 2}, warmup_steps=10)
    with pytest.raises(
        ValueError, match="warm-up \\(10 steps\\) is longer than the run \\(4 optimizer steps"
    ):
        quiet_trainer(max_steps=4).fit(module, FixedBatches())


@pytest.mark.parametrize(
    ("objective", "message"),
    [
        (
            [{"term": "hidden", "layers": [2, 4]}],
            "layer map entry 2 of \\[2, 4\\] must be a \\[student_layer, teacher_layer\\] pair of integers",
        ),
        ([{"term": "hidden", "layers": [["1", "2"]]}], "pair of integers"),
        ([{"term": "hidden", "weight": "high"}], "weight 'high': a weight is a number"),
    ],
)
def test_objective_typos_are_named(teacher: BertForMaskedLM, objective: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DistillationModule(teacher, {"init": "layers", "num_layers": 2}, objective=objective)


@pytest.mark.parametrize(
    ("student", "message"),
    [
        ({"init": "layers", "num_layers": "2"}, "num_layers must be a whole number, got '2' \\(str\\)"),
        ({"init": "layers", "layers": "0, 2"}, "layers must be a list of teacher block indices"),
        (
            {"init": "config", "config": {"num_hidden_layers": 2}, "hidden_size": 8.0},
            "hidden_size must be a whole",
        ),
    ],
)
def test_student_spec_typos_are_named(teacher: BertForMaskedLM, student: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DistillationModule(teacher, student)


def test_pruning_target_as_a_string_is_named() -> None:
    with pytest.raises(ValueError, match="target heads='0.5' must be a number"):
        PruningCallback({"heads": "0.5"})


def test_corrupt_ted_filter_file_is_named_without_suggesting_unsafe_loading(tmp_path: Path) -> None:
    broken = tmp_path / "teacher.pt"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(
        ValueError, match="teacher.pt cannot be read as TED filters.*Run stage I again"
    ) as caught:
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


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"learning_rate": "1e-3"}, "learning_rate must be a finite number, got '1e-3' \\(str\\)"),
        ({"learning_rate": -1.0}, "learning_rate must be > 0.0"),
        ({"eps": 0.0}, "eps must be > 0.0"),
        ({"betas": (0.9,)}, "betas must be two numbers"),
        ({"betas": (0.9, 1.0)}, "each of betas must be below 1"),
        ({"warmup_steps": -2}, "warmup_steps must be >= 0.0"),
        ({"warmup_steps": "0.1"}, "warmup_steps must be a finite number"),
        ({"compile": "yes"}, "compile must be true, false or a dict"),
        (
            {"allow_changes": ["learnig_rate"]},
            "allow_changes names \\['learnig_rate'\\], which are not arguments",
        ),
        ({"num_labels": 3}, None),
    ],
)
def test_module_options_are_checked_when_it_is_built(
    teacher: BertForMaskedLM, options: dict, message: str | None
) -> None:
    if message is None:  # num_labels against a classifier teacher given as an object
        two = BertForSequenceClassification(tiny_bert_config(num_labels=2))
        with pytest.raises(ValueError, match="num_labels=3, but the teacher given predicts 2 labels"):
            DistillationModule(two, {"init": "copy"}, task="sequence-classification", **options)
        return
    with pytest.raises(ValueError, match=message):
        DistillationModule(teacher, {"init": "layers", "num_layers": 2}, **options)


def test_a_run_without_a_last_step_is_refused(teacher: BertForMaskedLM) -> None:
    from lightning_kd.training.optimizer import adamw_with_warmup

    with pytest.raises(ValueError, match="no last step .* Set trainer.max_steps"):
        adamw_with_warmup(teacher.parameters(), float("inf"), 1e-3)


def test_true_half_precision_says_the_student_trains_in_it(teacher: BertForMaskedLM) -> None:
    module = DistillationModule(teacher, {"init": "layers", "num_layers": 2})
    with pytest.warns(
        UserWarning, match="precision='bf16-true' trains the student's weights .* 'bf16-mixed'"
    ):
        quiet_trainer(max_steps=1, precision="bf16-true").fit(module, FixedBatches(num_batches=1))


def test_a_term_option_error_points_at_the_terms_file(teacher: BertForMaskedLM) -> None:
    with pytest.raises(ValueError, match="See HiddenState in lightning_kd/objective/terms.py"):
        DistillationModule(teacher, {"init": "copy"}, objective=[{"term": "hidden", "layer": "last"}])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, "batch_size must be a whole number >= 1, got 0"),
        ({"batch_size": -1}, "batch_size must be a whole number >= 1"),
        ({"num_workers": -1}, "num_workers must be a whole number >= 0"),
        ({"max_length": "128"}, "max_length must be a whole number >= 1, got '128'"),
        ({"sources": "docstrings"}, "sources must be a list, e.g. sources: \\['docstrings'\\]"),
        ({"mlm_probability": "0.15"}, "mlm_probability must be a number in \\(0, 1\\)"),
    ],
)
def test_pretraining_data_options_are_checked_when_built(options: dict, message: str) -> None:
    from lightning_kd.datamodules import PretrainingDataModule

    with pytest.raises(ValueError, match=message):
        PretrainingDataModule(
            **{"tokenizer": "sentence-transformers/all-MiniLM-L6-v2", "sources": ["docstrings"], **options}
        )


@pytest.mark.parametrize(
    ("term", "message"),
    [
        ({"term": "logits", "temperature": float("inf")}, "temperature must be a finite number > 0, got inf"),
        ({"term": "logits", "temperature": "2"}, "temperature must be a finite number > 0, got '2'"),
        ({"term": "relations", "num_relation_heads": 0}, "num_relation_heads must be a whole number >= 1"),
        ({"term": "relations", "num_relation_heads": "2"}, "num_relation_heads must be a whole number >= 1"),
        ({"term": "hidden", "projection": "no"}, "projection must be true, false or left out"),
    ],
)
def test_term_options_are_checked_when_the_objective_is_built(
    teacher: BertForMaskedLM, term: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        DistillationModule(teacher, {"init": "layers", "num_layers": 2}, objective=[term])


def test_load_pruned_names_a_missing_folder_and_a_class_given_as_text(tmp_path: Path) -> None:
    from lightning_kd import load_pruned

    with pytest.raises(FileNotFoundError, match="no exported student at .*nowhere"):
        load_pruned(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="model_class must be a transformers class"):
        load_pruned(tmp_path, model_class="AutoModel")


def test_a_task_that_does_not_read_the_datas_labels_is_refused(teacher: BertForMaskedLM) -> None:
    module = DistillationModule(teacher, {"init": "layers", "num_layers": 2}, task="masked-lm")
    with pytest.raises(
        ValueError, match="task='masked-lm' predicts tokens, but the DataModule gives task 'mnli'"
    ):
        quiet_trainer(max_steps=1).fit(module, MNLIData())
