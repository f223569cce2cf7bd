"""ModernBERT through the adapter model: a fused query/key/value map, a gated FFN, rotary heads, a first block
without an attention norm, and per-layer attention kinds, each where it could go wrong."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import make_batch, make_model, output_logits
from transformers import AutoModelForMaskedLM

from lightning_kd.models import capture_qkv, get_adapter, keep_layers_, masked_lm_parts
from lightning_kd.pruning import export_pretrained, extract, full_masks, masked, prune_model, unit_counts

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5


def _layer_kinds(model: torch.nn.Module) -> list[str]:
    return [layer.attention_type for layer in get_adapter(model).layers(model)]


def test_units_of_the_fused_and_gated_maps() -> None:
    model = make_model("modernbert")
    counts = unit_counts(model)
    # Wqkv holds 3 x 4 heads of 8 rows, Wi holds 2 x 48 rows: one head or neuron per block entry
    assert counts["heads"] == [4, 4, 4] and counts["ffn"] == [48, 48, 48] and counts["head_size"] == 8
    masks = full_masks(model)
    masks["heads"][1, 2] = False
    masks["ffn"][0, 5] = False
    pruned = prune_model(model, {"heads": masks["heads"], "ffn": masks["ffn"]})
    teacher_layer, student_layer = model.model.layers[1], pruned.model.layers[1]
    # head 2's rows go from every block (query, key and value), and nothing else does
    kept = [
        r for block in range(3) for r in range(block * 32, block * 32 + 32) if not 16 <= r - block * 32 < 24
    ]
    assert torch.equal(student_layer.attn.Wqkv.weight, teacher_layer.attn.Wqkv.weight[kept])
    assert torch.equal(student_layer.attn.Wqkv.bias, teacher_layer.attn.Wqkv.bias[kept])
    # neuron 5 loses its activated row and its gate row together
    rows = [r for r in range(96) if r not in (5, 53)]
    assert torch.equal(pruned.model.layers[0].mlp.Wi.weight, model.model.layers[0].mlp.Wi.weight[rows])


def test_query_key_and_value_are_read_from_the_fused_map() -> None:
    model = make_model("modernbert")
    batch = make_batch(model)
    with capture_qkv(model, [0, 1]) as captured, torch.no_grad():
        model(**batch)
    layer = model.model.layers[1]
    with torch.no_grad():
        normed = layer.attn_norm(model(**batch, output_hidden_states=True).hidden_states[1])
        fused = layer.attn.Wqkv(normed)
    assert set(captured) == {0, 1} and set(captured[1]) == {"query", "key", "value"}
    for role, block in zip(("query", "key", "value"), fused.chunk(3, dim=-1), strict=True):
        assert captured[1][role].shape == (2, 10, 32)
        assert torch.allclose(captured[1][role], block, atol=1e-6), role


def test_the_head_is_applied_only_where_a_loss_reads() -> None:
    model = make_model("modernbert")
    batch = make_batch(model)
    parts = masked_lm_parts(model)
    with torch.no_grad():
        full = model(**batch).logits
        hidden = parts.encoder(**batch).last_hidden_state
        rows = torch.tensor([1, 7, 13])
        assert torch.allclose(
            parts.predict(hidden.reshape(-1, 32)[rows]), full.reshape(-1, 97)[rows], atol=1e-6
        )


def test_dropping_the_first_block_masks_and_prunes_alike_and_says_what_changed() -> None:
    model = make_model("modernbert", "cls")
    masks = full_masks(model)
    masks["layers"][0] = False
    masks["heads"][1, 0] = False
    masks["hidden"][::4] = False
    batch = make_batch(model)
    with torch.no_grad(), masked(model, masks):
        expected = model(**batch).logits
    with pytest.warns(UserWarning, match="layer 1, now first, lost its attention norm"):
        pruned = prune_model(model, masks)
    assert isinstance(pruned.model.layers[0].attn_norm, torch.nn.Identity)
    with torch.no_grad():
        assert torch.allclose(pruned(**batch).logits, expected, atol=ATOL)
    # each kept block keeps its attention kind, and the config says so for a reload
    assert _layer_kinds(pruned) == ["sliding_attention", "full_attention"]
    assert pruned.config.layer_types == ["sliding_attention", "full_attention"]


def test_a_depth_choice_keeps_each_blocks_attention_kind() -> None:
    model = make_model("modernbert", num_hidden_layers=6, global_attn_every_n_layers=3)
    assert _layer_kinds(model) == ["full_attention", "sliding_attention", "sliding_attention"] * 2
    with pytest.warns(UserWarning, match="attention norm"):
        student = extract(model, num_layers=3, strategy="rand")  # ETD's uniform choice: layers 1, 3, 5
    assert _layer_kinds(student) == ["sliding_attention", "full_attention", "sliding_attention"]
    assert [layer.attn.sliding_window for layer in student.model.layers] == [3, None, 3]
    kept = keep_layers_(make_model("modernbert"), [0, 2])  # layer 0 kept: nothing changes, no warning
    assert kept.config.layer_types == ["full_attention", "full_attention"]


def test_rotary_heads_are_removed_whole_never_narrowed(tmp_path: Path) -> None:
    model = make_model("modernbert")
    masks = full_masks(model)
    with pytest.raises(ValueError, match="heads cannot be narrowed: remove whole heads"):
        prune_model(
            model, {"head_dims": torch.ones(3, 8, dtype=torch.bool).index_fill_(1, torch.tensor([0]), False)}
        )
    masks["hidden"][:4] = False  # 28 dims: no whole number of 8-wide heads
    pruned = prune_model(model, {"hidden": masks["hidden"]})
    with pytest.raises(ValueError, match="keep the hidden size a multiple of 8"):
        export_pretrained(pruned, tmp_path)


READ_BACK = """
import sys, torch, transformers
folder, inputs, out = sys.argv[1:4]
batch = torch.load(inputs)
results = {}
for name in ("AutoModel", "AutoModelForMaskedLM", "AutoModelForSequenceClassification",
             "AutoModelForQuestionAnswering"):
    folder_name = f"{folder}/{name}"
    try:
        model = getattr(transformers, name).from_pretrained(folder_name).eval()
    except OSError:
        continue
    with torch.no_grad():
        output = model(**batch)
    results[name] = output.last_hidden_state if name == "AutoModel" else (
        torch.stack([output.start_logits, output.end_logits], 1) if name.endswith("Answering") else output.logits)
torch.save(results, out)
"""


def test_exports_load_in_a_fresh_process_with_plain_transformers(tmp_path: Path) -> None:
    """Layers pruned to different widths (zero-padded in the folder), the first block removed, each head."""
    batch = make_batch(make_model("modernbert"))
    expected = {}
    for name, head in (
        ("AutoModelForMaskedLM", "mlm"),
        ("AutoModelForSequenceClassification", "cls"),
        ("AutoModelForQuestionAnswering", "qa"),
    ):
        model = make_model("modernbert", head)
        masks = full_masks(model)
        masks["heads"][1, 1] = False
        masks["heads"][2, :2] = False
        masks["ffn"][2, ::3] = False
        masks["hidden"][:8] = False  # 24 dims: 3 heads of 8 at most
        masks["layers"][0] = False
        with pytest.warns(UserWarning, match="attention norm"):
            pruned = prune_model(model, masks).eval()
        export_pretrained(pruned, tmp_path / name)
        with torch.no_grad():
            expected[name] = output_logits(pruned(**batch))
            if head == "mlm":
                export_pretrained(pruned.model, tmp_path / "AutoModel")
                expected["AutoModel"] = pruned.model(**batch).last_hidden_state
    config = json.loads((tmp_path / "AutoModelForMaskedLM" / "config.json").read_text())
    assert config["lightning_kd"]["heads"] == [3, 2] and config["num_attention_heads"] == 3
    assert config["layer_types"] == ["sliding_attention", "full_attention"]
    torch.save(batch, tmp_path / "batch.pt")
    script = tmp_path / "read_back.py"
    script.write_text(READ_BACK)
    subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(tmp_path / "batch.pt"), str(tmp_path / "out.pt")],
        check=True,
        capture_output=True,
    )
    loaded = torch.load(tmp_path / "out.pt")
    assert loaded.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.allclose(loaded[name], value, atol=ATOL), name
    assert (
        AutoModelForMaskedLM.from_pretrained(tmp_path / "AutoModelForMaskedLM").config.num_hidden_layers == 2
    )
