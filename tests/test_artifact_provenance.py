"""Artifacts made for another model: every artifact records what it was made from, and reading it with another
model is refused naming both and the fix. A Lightning checkpoint given where a model is expected is recognised."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from kd_helpers import FixedBatches, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny_models import tiny_bert_config, tiny_classifier
from transformers import BertForMaskedLM, BertForSequenceClassification

from lightning_kd import DistillationModule, FineTuningModule
from lightning_kd.distillation.teacher_cache import TeacherCache
from lightning_kd.hub import load_model
from lightning_kd.ted.filters import LayerFilters, load_filters, save_filters
from lightning_kd.training.provenance import ArtifactMismatch, model_fingerprint, model_record, same_model


def masked_lm(seed: int) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(tiny_bert_config()).eval()


def test_the_fingerprint_tells_models_of_one_shape_apart_and_survives_a_save(tmp_path: Path) -> None:
    teacher = tiny_classifier(layers=2, num_labels=2)
    teacher.save_pretrained(tmp_path / "teacher")
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path / "teacher")
    assert model_fingerprint(reloaded) == model_fingerprint(teacher)
    assert model_fingerprint(tiny_classifier(layers=2, num_labels=2, seed=3)) != model_fingerprint(teacher)
    nudged = copy.deepcopy(teacher)
    with torch.no_grad():
        nudged.classifier.weight.add_(1e-3)  # a head trained a little further
    assert model_fingerprint(nudged) != model_fingerprint(teacher)
    # the same teacher in bfloat16 differs in every bit: only its shape is compared
    assert same_model(model_record(teacher), model_record(copy.deepcopy(teacher).to(torch.bfloat16)))


def test_ted_filters_of_another_teacher_of_the_same_shape_are_refused(tmp_path: Path) -> None:
    teacher = tiny_classifier(layers=2, num_labels=2)
    filters = LayerFilters([1, 2], 16, 16)
    path = save_filters(tmp_path / "teacher.pt", filters, made_with=teacher, steps=3)
    load_filters(path, "teacher", copy.deepcopy(teacher))  # the same teacher: read
    other = tiny_classifier(layers=2, num_labels=2, seed=7)
    with pytest.raises(ArtifactMismatch) as refused:
        load_filters(path, "teacher", other)
    message = str(refused.value)
    assert f"the stage-I TED filters of the teacher at {path}: made with" in message
    assert model_record(teacher)["fingerprint"] in message and model_record(other)["fingerprint"] in message
    assert (
        "Run stage I (stage: teacher) with this run's teacher, or give this run the teacher stage I used"
        in message
    )
    # files written before the record existed are read as before
    saved = torch.load(path, weights_only=True)
    saved.pop("made_with")
    torch.save(saved, tmp_path / "old.pt")
    load_filters(tmp_path / "old.pt", "teacher", other)


def test_a_checkpoint_of_another_tasks_head_says_how_to_use_it(tmp_path: Path) -> None:
    trainer = L.Trainer(logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.strategy.connect(FineTuningModule(tiny_classifier(layers=1, num_labels=2), task="sst2"))
    trainer.save_checkpoint(tmp_path / "sst2.ckpt")
    saved = torch.load(tmp_path / "sst2.ckpt", weights_only=False)
    assert (
        saved["lightning_kd"]["made_with"]["task"] == "sst2"
        and saved["lightning_kd"]["made_with"]["labels"] == 2
    )
    mnli = FineTuningModule(tiny_classifier(layers=1, num_labels=3), task="mnli")
    with pytest.raises(ArtifactMismatch) as refused:
        quiet_trainer().validate(mnli, FixedBatches(1).train_dataloader(), ckpt_path=tmp_path / "sst2.ckpt")
    message = str(refused.value)
    assert f"{tmp_path / 'sst2.ckpt'} was trained for task 'sst2' (2 labels)" in message
    assert "set up for 'mnli'" in message and "model.classifier.weight: (2, 16) in the checkpoint" in message
    assert "load it with task: sst2 (CLI: --model.init_args.task sst2)" in message
    assert ".model.save_pretrained('folder')" in message


def distil(teacher: BertForMaskedLM, tmp_path: Path, steps: int, ckpt_path: str | None = None) -> None:
    torch.manual_seed(0)
    module = DistillationModule(teacher, {"init": "layers", "num_layers": 1}, objective=[{"term": "hidden"}])
    trainer = quiet_trainer(
        max_steps=steps,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)],
    )
    trainer.fit(module, FixedBatches(2), ckpt_path=ckpt_path)


def test_resuming_against_another_teacher_under_the_same_name_is_refused(tmp_path: Path) -> None:
    distil(masked_lm(0), tmp_path, steps=1)
    record = torch.load(tmp_path / "last.ckpt", weights_only=False)["lightning_kd"]["made_with"]["teacher"]
    assert record["fingerprint"] == model_fingerprint(masked_lm(0))
    assert record["layers"] == tiny_bert_config().num_hidden_layers
    with pytest.raises(
        ArtifactMismatch,
        match=r"distilled from the teacher .*fingerprint .*other weights under "
        r"the same name\. Resume with the teacher the run started with",
    ):
        distil(masked_lm(1), tmp_path, steps=2, ckpt_path=str(tmp_path / "last.ckpt"))
    distil(masked_lm(0), tmp_path, steps=2, ckpt_path=str(tmp_path / "last.ckpt"))  # the same teacher resumes


def test_a_lightning_checkpoint_given_as_a_model_says_how_to_make_one(tmp_path: Path) -> None:
    trainer = L.Trainer(logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.strategy.connect(DistillationModule(masked_lm(0), {"init": "layers", "num_layers": 1}))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    with pytest.raises(ValueError) as refused:
        load_model(tmp_path / "last.ckpt")
    message = str(refused.value)
    assert "is a Lightning checkpoint (a training run's state), not a model" in message
    assert (
        f"DistillationModule.load_from_checkpoint('{tmp_path / 'last.ckpt'}').save_student('student')"
        in message
    )
    assert "--ckpt_path" in message
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ValueError, match=f"is a file, .* pass the folder that holds it \\({tmp_path}\\)"):
        load_model(tmp_path / "model.safetensors")


def test_a_teacher_cache_file_of_another_teacher_is_refused(tmp_path: Path) -> None:
    teacher, other = tiny_classifier(layers=1, num_labels=2), tiny_classifier(layers=1, num_labels=2, seed=4)
    needs = DistillationModule(teacher, {"init": "layers", "num_layers": 1}).objective.needs()
    cache = TeacherCache(str(tmp_path))
    cache.bind(teacher, needs)
    cache.entries, cache._dirty = {b"k": {"logits": torch.zeros(2)}}, True
    cache.save()
    stranger = TeacherCache(str(tmp_path))
    stranger.fingerprint = model_fingerprint(other)
    cache.path.rename(stranger.path)  # a cache copied in under the other teacher's name
    with pytest.raises(
        ArtifactMismatch, match=r"the teacher cache at .*: made with .* Delete .*computed again"
    ):
        stranger.bind(other, needs)


class WordTable:
    """A tokenizer as the record sees it: a name and a token -> id table."""

    def __init__(self, name: str, vocab: dict[str, int]) -> None:
        self.name_or_path, self.vocab = name, vocab

    def get_vocab(self) -> dict[str, int]:
        return self.vocab


def test_a_resume_with_a_tokenizer_of_another_vocabulary_is_refused() -> None:
    from lightning_kd.distillation.resume import check_distillation_resume
    from lightning_kd.training.provenance import tokenizer_record

    made = {"tokenizer": tokenizer_record(WordTable("bert-base-uncased", {"[PAD]": 0, "the": 1}))}
    checkpoint = {"hyper_parameters": {}, "lightning_kd": {"made_with": made}}
    check_distillation_resume(
        checkpoint, {}, "t", tokenizer=WordTable("copy", {"[PAD]": 0, "the": 1}), path="P"
    )
    with pytest.raises(
        ArtifactMismatch,
        match=r"the checkpoint at P: made with the tokenizer 'bert-base-uncased' "
        r"\(vocabulary \w+\), but this run's is 'gpt2' .*the same ids would mean other tokens",
    ):
        check_distillation_resume(checkpoint, {}, "t", tokenizer=WordTable("gpt2", {"!": 0}), path="P")


def test_an_exported_student_records_the_teacher_it_was_distilled_from(tmp_path: Path) -> None:
    """The model card of an export carries the checkpoint's record: two teachers of one name and shape differ
    only in the fingerprint it names."""
    import json

    teacher = masked_lm(0)
    module = DistillationModule(teacher, {"init": "layers", "num_layers": 1}, objective=[{"term": "hidden"}])
    quiet_trainer(max_steps=1).fit(module, FixedBatches(1))
    module.save_student(tmp_path / "student")
    card = (tmp_path / "student" / "README.md").read_text()
    recorded = json.loads(card.split("## Made with")[1].split("```json")[1].split("```")[0])
    assert (
        recorded["teacher"]["fingerprint"]
        == model_fingerprint(masked_lm(0))
        != model_fingerprint(masked_lm(1))
    )
    assert (
        recorded["head"] == "BertForMaskedLM"
        and recorded["teacher"]["layers"] == teacher.config.num_hidden_layers
    )
