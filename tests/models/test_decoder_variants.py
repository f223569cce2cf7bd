"""Qwen2 and Mistral share Llama's layout; what differs (Qwen2's tied LM head and q/k/v biases, Mistral's sliding
window) is what masking, shrinking and export touch, so those run here on both."""

from __future__ import annotations

import pytest
import torch
from tiny_models import LAYOUT_VARIANTS, make_batch, make_model, output_logits

from lightning_kd.pruning import export_pretrained, full_masks, load_pruned, masked, prune_model, unit_counts

pytestmark = pytest.mark.usefixtures("one_thread")


def _masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    masks = full_masks(model)
    masks["heads"][0, 1] = False  # one key/value group of layer 0, two of layer 2: ragged layers
    masks["heads"][2, [0, 3]] = False
    masks["ffn"][1, ::3] = False
    masks["hidden"][::4] = False
    masks["layers"][1] = False
    return masks


@pytest.mark.parametrize("arch", LAYOUT_VARIANTS)
@pytest.mark.parametrize("head", ["mlm", "cls"])
def test_masked_equals_pruned_and_the_padded_export_loads_back(arch: str, head: str, tmp_path) -> None:
    model = make_model(arch, head)
    masks = _masks(model)
    batch = make_batch(model)
    with torch.no_grad():
        full = output_logits(model(**batch))
        with masked(model, masks):
            expected = output_logits(model(**batch))
        pruned = prune_model(model, masks).eval()
        assert torch.allclose(output_logits(pruned(**batch)), expected, atol=1e-5)
        assert not torch.allclose(full, expected, atol=1e-3)  # the masks changed the outputs
    assert unit_counts(pruned)["heads"] == [3, 2]
    if model.config.tie_word_embeddings and head == "mlm":  # Qwen2: the head stays the embeddings
        assert pruned.get_output_embeddings().weight is pruned.get_input_embeddings().weight
    export_pretrained(pruned, tmp_path)
    small = load_pruned(tmp_path, type(model)).eval()
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in pruned.parameters())
    with torch.no_grad():
        assert torch.allclose(output_logits(small(**batch)), expected, atol=1e-5)
