"""Exported students load with plain transformers and compute what the pruned model computes."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import make_batch, make_model
from transformers import AutoModel

from lightning_kd.models import bind
from lightning_kd.pruning import export_pretrained, full_masks, load_pruned, prune_model

pytestmark = pytest.mark.usefixtures("one_thread")


ATOL = 1e-5


def _same_outputs(pruned, folder):
    batch = make_batch(pruned)
    with torch.no_grad():
        expected = pruned(**batch)
        expected_hidden = pruned.base_model(**batch).last_hidden_state
        same_class = type(pruned).from_pretrained(folder).eval()
        bare = AutoModel.from_pretrained(folder).eval()
        assert torch.allclose(same_class(**batch).logits, expected.logits, atol=ATOL)
        assert torch.allclose(bare(**batch).last_hidden_state, expected_hidden, atol=ATOL)
    return same_class


def test_uniform_export_has_a_plain_config(arch, tmp_path):
    model = make_model(arch)
    masks = full_masks(model)
    masks["heads"][:, 0] = False  # 3 heads of 8 ...
    masks["hidden"][::4] = False  # ... in 24 hidden dims: a standard BERT shape
    masks["ffn"][:, ::2] = False
    masks["layers"][0] = False
    pruned = prune_model(model, masks).eval()
    export_pretrained(pruned, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    queries = bind(model).queries_per_unit()  # a unit is a key/value group of that many heads under GQA
    assert (config["hidden_size"], config["num_attention_heads"]) == (24, 3 * queries)
    assert (config["intermediate_size"], config["num_hidden_layers"]) == (24, 2)
    assert "lightning_kd" not in config and "attention_head_size" not in config
    loaded = _same_outputs(pruned, tmp_path)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in pruned.parameters())


def test_non_uniform_export_is_padded_and_loads_back_small(arch, tmp_path):
    model = make_model(arch, "cls")
    masks = full_masks(model)
    masks["heads"][0, 1] = False
    masks["heads"][1, 3] = False
    masks["heads"][2, :2] = False
    masks["ffn"][1, ::3] = False
    masks["hidden"][::4] = False  # 24 dims hold at most 3 heads of 8 on BERT
    pruned = prune_model(model, masks).eval()
    export_pretrained(pruned, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["lightning_kd"]["heads"] == [3, 3, 2]
    _same_outputs(pruned, tmp_path)
    small = load_pruned(tmp_path, type(model)).eval()
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in pruned.parameters())
    batch = make_batch(model)
    with torch.no_grad():
        assert torch.allclose(small(**batch).logits, pruned(**batch).logits, atol=ATOL)


@pytest.mark.parametrize("arch_name", ["bert", "roberta"])
def test_heads_only_pruning_of_bert_exports(arch_name, tmp_path):
    """BERT derives head size from hidden_size / num_attention_heads, so fewer heads need padding."""
    model = make_model(arch_name)
    masks = full_masks(model)
    masks["heads"][:, :2] = False  # 2 heads of 8 in 32 hidden dims
    pruned = prune_model(model, {"heads": masks["heads"]}).eval()
    export_pretrained(pruned, tmp_path)
    _same_outputs(pruned, tmp_path)
    small = load_pruned(tmp_path, type(model))
    assert [layer.attention.self.query.out_features for layer in small.base_model.encoder.layer] == [16] * 3


def test_narrow_heads_in_a_wide_stream_are_padded_per_dimension(tmp_path):
    """3 heads of 10 in 36 dims: 36 is no multiple of 10, so each head is widened to 12 zero-padded
    dimensions, with queries rescaled so that the attention temperature stays that of 10-wide heads."""
    model = make_model("bert", num_attention_heads=4, hidden_size=40, intermediate_size=20)  # heads of 10
    masks = full_masks(model)
    masks["hidden"][:4] = False
    masks["heads"][:, 0] = False
    pruned = prune_model(model, masks).eval()
    export_pretrained(pruned, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["hidden_size"], config["num_attention_heads"]) == (36, 3)
    _same_outputs(pruned, tmp_path)


def test_export_refuses_heads_that_do_not_fit(tmp_path):
    model = make_model("bert")
    masks = full_masks(model)
    masks["hidden"][:8] = False  # 24 dims cannot hold 4 heads of 8
    pruned = prune_model(model, masks)
    with pytest.raises(ValueError, match="at most 3 heads"):
        export_pretrained(pruned, tmp_path)
