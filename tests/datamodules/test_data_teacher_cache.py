"""Teacher-output caching for task-specific distillation: computed once per example, reused, the same result as
without it, never served for another teacher or other data, refused where it would be wrong."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from kd_datafiles import TOKENIZER
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from lightning_kd import DistillationModule, GLUEDataModule
from lightning_kd.distillation.teacher_cache import TeacherCache


def teacher_model(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


def distil(
    teacher: BertForSequenceClassification, data: GLUEDataModule, epochs: int = 2, **kwargs: object
) -> DistillationModule:
    torch.manual_seed(1)
    module = DistillationModule(
        teacher,
        {"init": "layers", "num_layers": 1},
        objective=[{"term": "task"}, {"term": "logits", "temperature": 2.0}],
        **kwargs,
    )
    calls = []
    forward = teacher.forward
    teacher.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]
    L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=1000,
    ).fit(module, data)
    module.teacher_calls = len(calls)
    teacher.forward = forward
    return module


def sst2(glue_dir: Path) -> GLUEDataModule:
    return GLUEDataModule("sst2", TOKENIZER, data_dir=str(glue_dir / "SST-2"), max_length=32, batch_size=8)


def test_cached_distillation_runs_the_teacher_once_per_example_and_matches_uncached(
    glue_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    plain = distil(teacher_model(), sst2(glue_dir), epochs=3)
    cached = distil(teacher_model(), sst2(glue_dir), epochs=3, teacher_cache="memory")
    batches = 5  # 40 examples in batches of 8
    assert plain.teacher_calls == 3 * batches
    assert cached.teacher_calls == batches  # the first epoch only
    assert len(cached.teacher_cache.entries) == 40
    for (name, a), b in zip(
        plain.student.state_dict().items(), cached.student.state_dict().values(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-5), name
    assert "teacher cache: logits of 40 examples, about 0.0 MiB, kept in memory" in caplog.text


def test_disk_cache_is_reused_across_runs_and_keyed_by_teacher_and_data(
    glue_dir: Path, tmp_path: Path
) -> None:
    store = str(tmp_path / "cache")
    first = distil(teacher_model(), sst2(glue_dir), epochs=1, teacher_cache=store)
    assert first.teacher_calls == 5 and len(list(Path(store).glob("teacher-*.pt"))) == 1
    again = distil(teacher_model(), sst2(glue_dir), epochs=1, teacher_cache=store)
    assert again.teacher_calls == 0  # the same teacher on the same data: every output comes from disk
    other_teacher = distil(teacher_model(seed=5), sst2(glue_dir), epochs=1, teacher_cache=store)
    assert other_teacher.teacher_calls == 5 and len(list(Path(store).glob("teacher-*.pt"))) == 2
    edited = tmp_path / "SST-2"
    edited.mkdir()
    header, *rows = (glue_dir / "SST-2" / "train.tsv").read_text().splitlines()
    (edited / "train.tsv").write_text("\n".join([header] + [f"indeed {row}" for row in rows]) + "\n")
    (edited / "dev.tsv").write_text((glue_dir / "SST-2" / "dev.tsv").read_text())
    other_data = distil(teacher_model(), sst2(tmp_path), epochs=1, teacher_cache=store)
    assert other_data.teacher_calls == 5  # every example changed: other keys, computed afresh


def test_hidden_states_cache_serves_what_the_teacher_computes(
    glue_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    teacher = teacher_model()
    module = DistillationModule(
        teacher, {"init": "layers", "num_layers": 1}, objective=[{"term": "hidden", "layers": "uniform"}]
    )
    cache = TeacherCache(hidden_states=True)
    cache.bind(teacher, module.objective.needs())
    data = sst2(glue_dir)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    computed = cache.features(batch, lambda: module.teacher_features(batch))
    served = cache.features(batch, lambda: pytest.fail("a cached batch must not run the teacher"))
    mask = batch["attention_mask"].bool()
    assert torch.allclose(served.logits, computed.logits)
    for a, b in zip(served.hidden_states, computed.hidden_states, strict=True):
        assert torch.allclose(a[mask], b[mask])
    cache.announce(1000, 20.0, teacher)
    # (2 labels + 3 hidden states x 20 tokens x 16 dims) x 4 bytes x 1000 examples
    assert "logits and hidden states of 1000 examples, about 3.7 MiB" in caplog.text


def test_caching_is_refused_where_it_would_be_wrong(glue_dir: Path) -> None:
    teacher = teacher_model()
    hidden = DistillationModule(
        teacher, {"init": "layers", "num_layers": 1}, objective=[{"term": "hidden", "layers": "uniform"}]
    )
    with pytest.raises(ValueError, match="reads the teacher's hidden states.*'hidden_states': true"):
        TeacherCache().bind(teacher, hidden.objective.needs())
    with pytest.raises(ValueError, match="dropout-free teacher"):
        TeacherCache().bind(teacher_model().train(), hidden.objective.needs())
    mlm = BertForMaskedLM(
        BertConfig(
            vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    ).eval()
    with pytest.raises(ValueError, match="sequence-classification or question-answering teacher"):
        TeacherCache().bind(mlm, hidden.objective.needs())
    with pytest.raises(ValueError, match="unknown teacher_cache options"):
        TeacherCache.from_spec({"folder": "x"})
