"""The one export sequence both modules use (lightning_kd.training.export): folder, tokenizer, label names,
card, the rescue folder, the sizes line and the hub upload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kd_helpers import tiny_bert_config
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from lightning_kd.training.export import CardFacts, export_model


class FakeTokenizer:
    def save_pretrained(self, path: str | Path) -> None:
        (Path(path) / "tokenizer.json").write_text("{}")


class FakeHub:
    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id: str, **kwargs: object) -> str:
        FakeHub.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs: object) -> None:
        FakeHub.calls.append(("upload_folder", dict(kwargs)))


def classifier() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(num_labels=2))


def test_export_writes_model_tokenizer_labels_and_card(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = classifier()
    sizes = export_model(
        model,
        tmp_path / "out",
        FakeTokenizer(),
        ("bad", "good"),
        card=CardFacts(teacher="me/teacher", method="made by hand", metrics={"val/acc": 0.5}),
        log_sizes=True,
    )
    count = sum(p.numel() for p in model.parameters())
    assert sizes == (count, count)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert loaded.config.id2label == {0: "bad", 1: "good"}
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: me/teacher" in card and "- method: made by hand" in card
    assert "| val/acc | 0.5000 |" in card and "AutoModelForSequenceClassification" in card
    assert "Labels, in id order: `bad`, `good`." in card
    assert (
        f"exported: {count / 1e6:.2f}M parameters, as plain transformers loads it" in capsys.readouterr().out
    )


def test_card_given_as_a_function_is_asked_only_once_the_folder_is_written(tmp_path: Path) -> None:
    asked = []

    def card() -> CardFacts:
        asked.append((tmp_path / "out" / "config.json").is_file())
        return CardFacts(teacher="", method="m")

    export_model(classifier(), tmp_path / "out", card=card)
    assert asked == [True]


def test_failed_save_is_rescued_only_when_asked(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file where the folder should go")
    card_asked = []

    def card() -> CardFacts:
        card_asked.append(1)
        return CardFacts(teacher="", method="m")

    with pytest.raises(OSError) as plain:
        export_model(classifier(), tmp_path / "taken", card=card)
    assert "could not save" not in str(plain.value)
    assert not list(tmp_path.glob("*-rescued-*"))

    with pytest.raises(OSError, match="could not save the student to .*taken.*saved to .*student-rescued-"):
        export_model(
            classifier(), tmp_path / "taken", card=card, rescue_root=tmp_path / "run", name="student"
        )
    (rescued,) = (tmp_path / "run").glob("student-rescued-*")
    assert torch.equal(
        AutoModelForSequenceClassification.from_pretrained(rescued).classifier.weight,
        classifier().classifier.weight,
    )
    assert card_asked == []  # no card for a folder that was not written


def test_push_uploads_the_written_folder_and_says_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls = []
    export_model(
        classifier(),
        tmp_path / "out",
        card=CardFacts(teacher="", method="m"),
        push_to_hub="me/model",
        private=False,
        name="fine-tuned model",
    )
    assert FakeHub.calls[0] == (
        "create_repo",
        {"repo_id": "me/model", "private": False, "exist_ok": True, "repo_type": "model"},
    )
    assert Path(FakeHub.calls[1][1]["folder_path"]) == tmp_path / "out"
    assert "fine-tuned model pushed to https://huggingface.co/me/model" in capsys.readouterr().out


def test_a_model_that_saves_itself_is_saved_so_at_its_own_size(tmp_path: Path) -> None:
    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = classifier()

        def save_pretrained(self, path: str | Path) -> None:
            self.inner.save_pretrained(path)

    wrapped = Wrapped()
    count = sum(p.numel() for p in wrapped.parameters())
    assert export_model(wrapped, tmp_path / "out", card=CardFacts(teacher="", method="m")) == (count, count)
    assert (tmp_path / "out" / "README.md").is_file()
    with pytest.raises(TypeError, match="needs a transformers PreTrainedModel"):
        export_model(torch.nn.Linear(2, 2), tmp_path / "linear", card=CardFacts(teacher="", method="m"))
