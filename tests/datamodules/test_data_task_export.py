"""Exports a user can ship: the teacher's pooler kept, the task's label names, a model card, both sizes of a
student with per-layer widths, and push_to_hub (checked by the arguments it passes, nothing is uploaded)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from kd_datafiles import TOKENIZER
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
)

from lightning_kd import (
    DistillationModule,
    DistillationReport,
    FineTuningModule,
    GLUEDataModule,
    PruningCallback,
)
from lightning_kd.pruning import load_pruned


def config(**overrides: object) -> BertConfig:
    settings = dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertConfig(**{**settings, **overrides})


def trainer(**kwargs: object) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def sst2(glue_dir: Path) -> GLUEDataModule:
    return GLUEDataModule("sst2", TOKENIZER, data_dir=str(glue_dir / "SST-2"), max_length=32, batch_size=8)


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records what would be uploaded."""

    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id: str, **kwargs: object) -> str:
        FakeHub.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs: object) -> None:
        FakeHub.calls.append(
            (
                "upload_folder",
                {**kwargs, "files": sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())},
            )
        )


def test_pruned_bare_student_exports_the_teachers_pooler_both_sizes_and_a_card(
    glue_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    torch.manual_seed(0)
    teacher = BertModel(config()).eval()
    module = DistillationModule(teacher, {"init": "copy"})
    # units compete across layers, so the layers end with different widths (padded in plain transformers)
    pruning = PruningCallback(
        {"heads": 0.5, "ffn": 0.5}, end_step=3, interval=1, same_per_layer=False, physical=False
    )
    report = DistillationReport(export_dir=str(tmp_path / "student"))
    trainer(max_steps=3, limit_val_batches=0, callbacks=[pruning, report]).fit(module, sst2(glue_dir))
    folder = tmp_path / "student"
    classifier, info = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=2, output_loading_info=True
    )
    assert all(key.startswith("classifier.") for key in info["missing_keys"]), info["missing_keys"]
    assert torch.equal(
        classifier.bert.pooler.dense.weight, teacher.pooler.dense.weight
    )  # hidden was not pruned
    true_size = sum(p.numel() for p in module.student.parameters())
    plain_size = sum(p.numel() for p in AutoModel.from_pretrained(folder).parameters())
    assert sum(p.numel() for p in load_pruned(folder).parameters()) == true_size < plain_size
    out = capsys.readouterr().out
    assert (
        f"exported: {true_size / 1e6:.2f}M parameters; plain transformers loads {plain_size / 1e6:.2f}M"
        in out
    )
    card = (folder / "README.md").read_text()
    assert f"{true_size / 1e6:.2f}M" in card and f"{plain_size / 1e6:.2f}M" in card and "load_pruned" in card
    assert "HomoDistil pruning" in card and "| teacher |" in card and "AutoModel.from_pretrained" in card
    assert "discrepancy" in card.lower()


def test_distilled_classifier_carries_label_names_metrics_and_is_pushed(
    glue_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls = []
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(config(num_labels=2)).eval()
    module = DistillationModule(teacher, {"init": "layers", "num_layers": 1}, objective=[{"term": "logits"}])
    report = DistillationReport(export_dir=str(tmp_path / "student"), push_to_hub="me/tiny-sst2")
    trainer(max_steps=2, limit_val_batches=2, callbacks=[report]).fit(module, sst2(glue_dir))
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student")
    assert loaded.config.id2label == {0: "negative", 1: "positive"}
    assert loaded.config.label2id == {"negative": 0, "positive": 1}
    card = (tmp_path / "student" / "README.md").read_text()
    assert (
        "val/sst2/accuracy" in card
        and "val/teacher/sst2/accuracy" in card
        and "val/gap/sst2/accuracy" in card
    )
    assert "AutoModelForSequenceClassification" in card
    assert [name for name, _ in FakeHub.calls] == ["create_repo", "upload_folder"]
    assert FakeHub.calls[0][1] == {
        "repo_id": "me/tiny-sst2",
        "private": True,
        "exist_ok": True,
        "repo_type": "model",
    }
    upload = FakeHub.calls[1][1]
    assert upload["repo_id"] == "me/tiny-sst2" and Path(upload["folder_path"]) == tmp_path / "student"
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(upload["files"])
    with pytest.raises(ValueError, match="set export_dir too"):
        DistillationReport(push_to_hub="me/x")


def test_fine_tuned_export_has_label_names_and_a_card(glue_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = GLUEDataModule("mnli", TOKENIZER, data_dir=str(glue_dir / "MNLI"), max_length=32, batch_size=8)
    module = FineTuningModule(
        BertForSequenceClassification(config(num_labels=3)), "mnli", export_dir=str(tmp_path / "teacher")
    )
    trainer(max_steps=2, limit_val_batches=1).fit(module, data)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "teacher")
    assert loaded.config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    card = (tmp_path / "teacher" / "README.md").read_text()
    assert "fine-tuned on mnli" in card and "val/mnli/validation_matched/accuracy" in card
