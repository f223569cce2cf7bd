"""Bad input found by trying the library as a new user: each is refused early, naming the problem and the fix."""

from __future__ import annotations

import copy
import json
import os
import pickle
from collections.abc import Iterator
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


# ------------------------------------------------------------------ runs that would do nothing or never end
# (issue 25.1; docs/operations.md, "Runs that would do nothing")

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_teacher() -> BertForMaskedLM:
    """A tiny teacher with MiniLM's vocabulary, so the offline tokenizer's text fits it."""
    torch.manual_seed(0)
    return BertForMaskedLM(tiny_bert_config(vocab_size=30522, max_position_embeddings=128)).eval()


def text_data(tmp_path: Path, documents: int = 40, **options: Any) -> Any:
    from lightning_kd.datamodules import PretrainingDataModule

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Sentence {i} is about distilling small models." for i in range(documents)))
    return PretrainingDataModule(
        tokenizer=MINILM, sources=[str(corpus)], max_length=16, batch_size=2, **options
    )


def test_an_objective_of_zero_weights_or_a_frozen_student_is_refused(teacher: BertForMaskedLM) -> None:
    zero = [{"term": "hidden", "weight": 0}, {"term": "logits", "weight": 0.0}]
    module = DistillationModule(teacher, {"init": "layers", "num_layers": 2}, objective=zero)
    trainer = quiet_trainer(max_steps=2)
    with pytest.raises(
        ValueError, match="every term of the objective weighs 0 \\(hidden.*: 0, logits.*: 0\\)"
    ):
        trainer.fit(module, FixedBatches())
    assert trainer.global_step == 0
    frozen = DistillationModule(teacher, {"init": "layers", "num_layers": 2})
    frozen.student.requires_grad_(False)
    with pytest.raises(
        ValueError, match="DistillationModule has no parameter to train.*requires_grad_\\(True\\)"
    ):
        quiet_trainer(max_steps=2).fit(frozen, FixedBatches())


def test_a_run_that_never_ends_is_refused(tmp_path: Path, teacher: BertForMaskedLM) -> None:
    module = DistillationModule(minilm_teacher(), {"init": "layers", "num_layers": 2})
    trainer = quiet_trainer(max_epochs=2)
    with pytest.raises(ValueError, match="repeats forever.*max_epochs=2 can never stop the run.*max_steps"):
        trainer.fit(module, text_data(tmp_path))
    assert trainer.global_step == 0
    # a whole number of batches per epoch ends every epoch: that run is bounded, and runs
    bounded = quiet_trainer(max_epochs=1, limit_train_batches=1)
    bounded.fit(module, text_data(tmp_path))
    assert bounded.global_step == 1
    # finite data with max_epochs=-1 (Lightning's "train forever") and no max_steps
    finite = DistillationModule(teacher, {"init": "layers", "num_layers": 2})
    with pytest.raises(ValueError, match="max_epochs=-1 trains without an epoch limit.*never end"):
        quiet_trainer(max_epochs=-1).fit(finite, FixedBatches())


def test_a_step_limit_the_epochs_end_before_is_named_and_pruning_ends_with_the_run(
    teacher: BertForMaskedLM,
) -> None:
    from lightning_kd.pruning.units import unit_counts

    module = DistillationModule(teacher)
    pruning = PruningCallback({"heads": 0.5}, interval=1)
    trainer = quiet_trainer(max_epochs=1, max_steps=5, callbacks=[pruning])
    with pytest.warns(
        UserWarning,
        match="ends after max_epochs=1 epochs of 2 batches, at optimizer step 2, before .*max_steps=5",
    ):
        trainer.fit(module, FixedBatches(num_batches=2))
    # the schedule ended where the run did, so the student reached its target (it ended at step 5: never)
    assert trainer.global_step == 2 and pruning.end_step == 2
    assert set(unit_counts(module.student)["heads"]) == {2}


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_an_evaluation_with_nothing_to_read_is_refused(teacher: BertForMaskedLM, stage: str) -> None:
    module = DistillationModule(teacher, {"init": "layers", "num_layers": 2})
    # Lightning's words: "`predict_dataloader` must be implemented to be used with the Lightning Trainer"
    with pytest.raises(
        ValueError, match=f"`{stage}` has nothing to read: FixedBatches has no .*GLUEDataModule"
    ):
        getattr(quiet_trainer(), stage)(module, datamodule=FixedBatches())
    with pytest.raises(
        ValueError, match=f"`{stage}` has nothing to read: the .* of the dataloaders given holds no example"
    ):
        getattr(quiet_trainer(), stage)(module, dataloaders=DataLoader([], batch_size=None))


def test_fine_tuning_and_a_stream_without_val_sources_have_nothing_to_evaluate(tmp_path: Path) -> None:
    from lightning_kd import FineTuningModule

    classifier = BertForSequenceClassification(tiny_bert_config(num_labels=2))
    with pytest.raises(
        ValueError, match="`predict` has nothing to read: FixedBatches has no data to predict"
    ):
        quiet_trainer().predict(FineTuningModule(classifier, "sst2"), datamodule=FixedBatches())
    module = DistillationModule(minilm_teacher(), {"init": "layers", "num_layers": 2})
    with pytest.raises(
        ValueError,
        match="`validate` has nothing to read: PretrainingDataModule gives no validation data.*val_sources",
    ):
        quiet_trainer().validate(module, datamodule=text_data(tmp_path))
    with pytest.raises(
        ValueError, match="`test` has nothing to read: PretrainingDataModule has no test data.*`validate`"
    ):
        quiet_trainer().test(module, datamodule=text_data(tmp_path))


def test_squad_predict_on_a_file_without_questions_is_refused(tmp_path: Path) -> None:
    from transformers import BertForQuestionAnswering

    from lightning_kd import FineTuningModule, SQuADDataModule

    empty = tmp_path / "questions.json"
    empty.write_text(json.dumps({"version": "v2.0", "data": []}))
    model = BertForQuestionAnswering(tiny_bert_config(vocab_size=30522, max_position_embeddings=128))
    data = SQuADDataModule(
        "v2.0",
        MINILM,
        str(tmp_path),
        max_length=64,
        doc_stride=16,
        max_query_length=16,
        predict_file=str(empty),
    )
    # it ran zero steps and wrote nothing; Lightning only warned "Total length of `DataLoader` across ranks is zero"
    with pytest.raises(
        ValueError,
        match="`predict` has nothing to read: the data to predict of SQuADDataModule holds no example",
    ):
        quiet_trainer().predict(FineTuningModule(model, "squad_v2"), data)


def test_a_pruning_target_or_schedule_that_prunes_nothing_is_refused(teacher: BertForMaskedLM) -> None:
    trainer = quiet_trainer(max_steps=2, callbacks=[PruningCallback({"heads": 1.0})])
    with pytest.raises(
        ValueError, match="target \\{'heads': 1.0\\} keeps every unit \\(heads 4\\).*prune nothing"
    ):
        trainer.fit(DistillationModule(teacher), FixedBatches())
    assert trainer.global_step == 0
    with pytest.raises(ValueError, match="gives 0.0 at progress 1.0, but it must give 1.0"):
        PruningCallback({"heads": 0.5}, schedule=lambda progress: 0.0)


# ------------------------------------------------------------------ Lightning, PyTorch, pickling and worker errors
# restated in our words (issue 25.4; docs/operations.md, "Errors of Lightning, PyTorch or a worker, restated")


def test_two_pruning_callbacks_are_refused_in_our_words(teacher: BertForMaskedLM) -> None:
    # Lightning refused these when the Trainer was built: "Found more than one stateful callback of type
    # `PruningCallback`", naming no fix
    trainer = quiet_trainer(max_steps=2, callbacks=[PruningCallback(), PruningCallback()])
    with pytest.raises(ValueError, match="2 PruningCallbacks .*keep one, with every kind in its target"):
        trainer.fit(DistillationModule(teacher), FixedBatches())
    assert trainer.global_step == 0


def test_a_schedule_ddp_spawn_cannot_pickle_is_named_with_the_fix() -> None:
    def ramp(progress: float) -> float:
        return progress

    callback = PruningCallback({"heads": 0.5}, schedule=ramp)
    with pytest.raises(
        pickle.PicklingError, match="schedule '.*ramp' cannot be pickled.*top level of a module"
    ) as caught:
        pickle.dumps(callback)
    assert "Can't pickle local object" in str(caught.value.__cause__)
    # as ddp_spawn meets it: refused before any process starts
    trainer = quiet_trainer(max_steps=2, strategy="ddp_spawn", devices=2, callbacks=[callback])
    with pytest.raises(pickle.PicklingError, match="schedule '.*ramp' cannot be pickled"):
        trainer.fit(DistillationModule(BertForMaskedLM(tiny_bert_config()).eval()), FixedBatches())
    pickle.loads(pickle.dumps(PruningCallback({"heads": 0.5}, schedule="linear")))  # the named ones travel
    assert copy.deepcopy(callback).schedule(0.25) == 0.25  # copying needs no pickling


def test_too_few_documents_for_the_readers_is_refused_before_the_workers_start(tmp_path: Path) -> None:
    from lightning_kd.datamodules import DataSourceError

    data = text_data(tmp_path, documents=1, num_workers=2)
    # in a worker this arrived as "Caught DataSourceError in DataLoader worker process 1"
    with pytest.raises(
        DataSourceError, match="no documents for reader 1 of 2 .*use fewer dataloader workers"
    ):
        data.train_dataloader()
    text_data(tmp_path, documents=2, num_workers=2).train_dataloader()  # one each: fine


# ------------------------------------------------------------------ `lightning-kd validate/test/predict` (issue 26.6)


def test_cli_evaluation_without_a_checkpoint_names_the_weights_and_refuses_a_training_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    from lightning_kd.cli import main

    monkeypatch.delenv("WANDB_MODE", raising=False)
    model = tmp_path / "model"
    torch.manual_seed(0)
    classifier = tiny_bert_config(vocab_size=30522, max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(classifier).save_pretrained(model)
    glue = tmp_path / "SST-2"
    glue.mkdir()
    rows = [f"a sentence about models number {i}\t{i % 2}" for i in range(8)]
    for name in ("train.tsv", "dev.tsv"):
        (glue / name).write_text("\n".join(["sentence\tlabel", *rows]) + "\n")
    data = {"task": "sst2", "tokenizer": MINILM, "data_dir": str(tmp_path), "max_length": 32}
    recipes = {
        "fine-tuning": ("lightning_kd.FineTuningModule", {"model": str(model), "task": "sst2"}),
        "distillation": (
            "lightning_kd.DistillationModule",
            {"teacher": str(model), "task": "sequence-classification"},
        ),
    }
    for kind, (class_path, init_args) in recipes.items():
        recipe = {
            "model": {"class_path": class_path, "init_args": init_args},
            "data": {"class_path": "lightning_kd.GLUEDataModule", "init_args": data},
            "trainer": {
                "accelerator": "cpu",
                "logger": False,
                "enable_progress_bar": False,
                "default_root_dir": str(tmp_path / "run"),
            },
        }
        config = tmp_path / f"{kind}.yaml"
        config.write_text(yaml.safe_dump(recipe))
        built = (
            "the student as the recipe builds it"
            if kind == "distillation"
            else "the model as the recipe loads"
        )
        for subcommand in ("validate", "test", "predict") if kind == "fine-tuning" else ("test",):
            with pytest.raises(
                ValueError,
                match=f"`lightning-kd {subcommand}` without --ckpt_path would evaluate {built}.*--ckpt_path none",
            ):
                main([subcommand, "--config", str(config)])
    main(["validate", "--config", str(config), "--ckpt_path", "none", "--trainer.limit_val_batches=1"])
    out = capsys.readouterr().out
    assert (
        "lightning-kd validate: evaluating the student as the recipe builds it (its init, not distilled) "
        "(DistillationModule), before any training: no checkpoint is loaded (--ckpt_path none)"
    ) in out
    assert "val/sst2/accuracy" in out  # it ran, on the weights it named


def test_every_test_the_bad_input_table_names_exists() -> None:
    """The table in docs/operations.md points each row to its test: a renamed or removed test fails here."""
    import re

    root = Path(__file__).resolve().parents[1]
    table = (root / "docs" / "operations.md").read_text()
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", table))
    defined = {
        name
        for path in (root / "tests").rglob("test_*.py")
        for name in re.findall(r"^def (test_[a-z0-9_]+)", path.read_text(), flags=re.M)
    }
    assert named, "the table names no test"
    assert not named - defined, f"docs/operations.md names tests that do not exist: {sorted(named - defined)}"


# ------------------------------------------------------------------------------------------ FSDP2 runs


@pytest.fixture
def launcher_environment() -> Iterator[None]:
    """Lightning's launcher writes MASTER_ADDR, MASTER_PORT, NODE_RANK and LOCAL_RANK into this process's
    environment; left there, a later test's DDP script would take LOCAL_RANK for a launcher of its own and never
    start its second rank."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.usefixtures("launcher_environment")
def test_fsdp2_on_a_module_it_does_not_shard_says_what_to_use() -> None:
    """Lightning refused with "you are required to override the configure_model() hook", which a user of
    lightning-kd never writes; fsdp2() names what it shards and what to use instead, before a process group."""
    from lightning_kd import FineTuningModule
    from lightning_kd.training import fsdp2

    module = FineTuningModule(BertForSequenceClassification(tiny_bert_config(num_labels=2)), task="sst2")
    with pytest.raises(ValueError, match=r"fsdp2\(\) shards a DistillationModule.*strategy='ddp'"):
        quiet_trainer(strategy=fsdp2(), max_steps=1).fit(module, FixedBatches(1))


@pytest.mark.usefixtures("launcher_environment")
def test_fsdp2_with_a_student_of_another_width_is_refused_before_a_step() -> None:
    """The objective's learned projections (a student narrower than its teacher) are not sharded: refused when
    the model is configured, naming the two ways that work, instead of training them unsynchronised."""
    from lightning_kd.training import fsdp2

    torch.manual_seed(0)
    teacher = BertForMaskedLM(tiny_bert_config())
    student = BertForMaskedLM(tiny_bert_config(hidden_size=8, num_attention_heads=2))
    module = DistillationModule(teacher, student, objective=[{"term": "hidden"}])
    with pytest.raises(
        ValueError, match=r"does not shard yet.*student of the teacher's width.*strategy='ddp'"
    ):
        try:
            quiet_trainer(strategy=fsdp2(), max_steps=1).fit(module, FixedBatches(1))
        finally:  # the one-process group the strategy started: later tests expect none
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
    assert module.trainer.global_step == 0
