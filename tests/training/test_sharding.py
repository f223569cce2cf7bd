"""The pieces of FSDP2 support that need no process group: the strategy's settings, the rebuilding of a student
from its meta-device skeleton, and that everything sharding-specific stands aside under other strategies (the
two-process runs are in test_fsdp.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import BertForMaskedLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kd_helpers import make_batch, tiny_bert_config  # noqa: E402

from lightning_kd import DistillationModule  # noqa: E402
from lightning_kd.training import FSDP2Strategy, fsdp2  # noqa: E402
from lightning_kd.training.lightning_internals import data_parallel_auto  # noqa: E402
from lightning_kd.training.sharded_surgery import _materialize, student_for_export, whole_student  # noqa: E402
from lightning_kd.training.sharding import meta_copy, shard_plan  # noqa: E402


def test_bad_settings_name_the_choices() -> None:
    with pytest.raises(ValueError, match="'sharded'.*'replicated'"):
        fsdp2(teacher="half")
    with pytest.raises(ValueError, match="bf16, fp16, or None"):
        fsdp2(mixed_precision="fp8")


def test_every_rank_goes_on_the_data_parallel_axis() -> None:
    strategy = fsdp2(teacher="replicated", mixed_precision="bf16", activation_checkpointing=True)
    assert isinstance(strategy, FSDP2Strategy)
    strategy.parallel_devices = [torch.device("cpu")] * 4
    strategy.num_nodes = 2
    data_parallel_auto(strategy)
    # Lightning's "auto" would have put 1 rank per node on the data-parallel axis and 4 on the tensor one
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (8, 1)


def test_a_student_rebuilt_from_its_skeleton_is_the_student() -> None:
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config()).eval()
    skeleton = meta_copy(model)
    assert all(p.is_meta for p in skeleton.parameters())
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    rebuilt = _materialize(skeleton, weights, dict(model.named_buffers())).eval()
    # the MLM decoder stays tied to the word embeddings: one parameter, as in the model it came from
    assert rebuilt.cls.predictions.decoder.weight is rebuilt.bert.embeddings.word_embeddings.weight
    batch = make_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    assert torch.equal(rebuilt(**inputs).logits, model(**inputs).logits)


def test_without_sharding_the_student_is_left_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = DistillationModule(BertForMaskedLM(tiny_bert_config()), {"init": "copy"})
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False)
    module.trainer = trainer
    module.configure_model()  # a single-device run: nothing to shard
    assert shard_plan(module) is None
    student = module.student
    with whole_student(trainer, module), student_for_export(module):
        assert module.student is student
