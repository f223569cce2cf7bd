"""A masked model computes exactly what the physically pruned model computes."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_batch, make_model, output_logits

from lightning_kd.models import bind
from lightning_kd.pruning import (
    apply_masks,
    full_masks,
    masked,
    masked_parameter_slices,
    prune_model,
    unit_counts,
    zero_masked_,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5


def _masks(model, kinds):
    masks = full_masks(model)
    chosen = {}
    if "heads" in kinds:
        masks["heads"][0, 1] = False
        masks["heads"][2, [0, 3]] = False
        chosen["heads"] = masks["heads"]
    if "ffn" in kinds:
        masks["ffn"][1, ::3] = False
        masks["ffn"][0, :5] = False
        chosen["ffn"] = masks["ffn"]
    if "hidden" in kinds:
        masks["hidden"][::4] = False
        chosen["hidden"] = masks["hidden"]
    if "layers" in kinds:
        masks["layers"][1] = False
        chosen["layers"] = masks["layers"]
    return chosen


def _compare(model, masks):
    batch = make_batch(model)
    with torch.no_grad():
        full = model(**batch, output_hidden_states=True)
        with masked(model, masks):
            ref = model(**batch, output_hidden_states=True)
        pruned = prune_model(model, masks)
        out = pruned(**batch, output_hidden_states=True)
    kept = masks.get("hidden", torch.ones(model.config.hidden_size, dtype=torch.bool))
    assert torch.allclose(ref.hidden_states[-1][..., kept], out.hidden_states[-1], atol=ATOL)
    assert torch.allclose(output_logits(ref), output_logits(out), atol=ATOL)
    assert not torch.allclose(output_logits(full), output_logits(ref), atol=1e-3), (
        "the masks should change them"
    )
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    return pruned


@pytest.mark.parametrize(
    "kinds",
    [("heads",), ("ffn",), ("hidden",), ("layers",), ("heads", "ffn", "hidden", "layers")],
    ids=lambda kinds: "+".join(kinds),
)
@pytest.mark.parametrize("head", ["mlm", "cls", "qa"])
def test_masked_equals_pruned(arch, head, kinds):
    model = make_model(arch, head)
    pruned = _compare(model, _masks(model, kinds))
    assert type(pruned) is type(model)


@pytest.mark.parametrize(
    "overrides",
    [
        # DeBERTa-v2-xlarge style: a convolution after layer 0, separate position projections, raw rel embeddings
        {"conv_kernel_size": 3, "share_att_key": False, "norm_rel_ebd": "none"},
        # a narrower word embedding projected into the residual stream
        {"embedding_size": 24},
        # the non-legacy MLM head, which multiplies by the word embeddings directly
        {"legacy": False},
    ],
    ids=["conv-separate-keys", "embed-proj", "modern-head"],
)
def test_deberta_variants(overrides):
    for head in ("mlm", "cls"):
        model = make_model("deberta-v2", head, **overrides)
        masks = _masks(model, ("heads", "ffn", "hidden"))
        if "conv_kernel_size" not in overrides:
            masks["layers"] = torch.tensor([True, False, True])
        _compare(model, masks)


def test_uniform_pruning_gives_a_standard_config(arch):
    model = make_model(arch)
    masks = full_masks(model)
    masks["heads"][:, 1] = False
    masks["ffn"][:, 10:] = False
    pruned = prune_model(model, masks)
    queries = bind(model).queries_per_unit()  # a unit is a key/value group of that many heads under GQA
    assert (pruned.config.num_attention_heads, pruned.config.intermediate_size) == (3 * queries, 10)
    assert unit_counts(pruned)["heads"] == [3, 3, 3]


def test_hooks_are_removable(arch):
    model = make_model(arch)
    batch = make_batch(model)
    with torch.no_grad():
        before = model(**batch).logits
        handle = apply_masks(model, _masks(model, ("heads", "ffn", "hidden", "layers")))
        handle.remove()
        after = model(**batch).logits
    assert torch.equal(before, after)


def test_zero_masked_weights_and_slices(arch):
    model = make_model(arch)
    masks = _masks(model, ("heads", "ffn", "hidden"))
    slices = masked_parameter_slices(model, masks)
    names = dict(model.named_parameters())
    assert slices and all(piece.name in names for piece in slices)
    zero_masked_(model, masks)
    for piece in slices:
        assert piece.parameter.index_select(piece.dim, piece.index).abs().sum() == 0
    # zeroed units are dead: masking them on top changes nothing but the LayerNorm statistics of hidden dims
    batch = make_batch(model)
    heads_ffn = {k: masks[k] for k in ("heads", "ffn")}
    with torch.no_grad():
        plain = model(**batch).logits
        with masked(model, heads_ffn):
            assert torch.allclose(model(**batch).logits, plain, atol=ATOL)


def test_masks_that_leave_a_layer_empty_are_refused(arch):
    model = make_model(arch)
    masks = full_masks(model)
    masks["heads"][1] = False
    with pytest.raises(ValueError, match=r"every attention head of layer\(s\) \[1\].*remove those layers"):
        prune_model(model, {"heads": masks["heads"]})
    # removing the layer as well is the clear way out
    masks["layers"][1] = False
    pruned = prune_model(model, {"heads": masks["heads"], "layers": masks["layers"]})
    assert pruned.config.num_hidden_layers == 2


def test_bad_masks_are_refused(arch):
    model = make_model(arch)
    with pytest.raises(ValueError, match="shape"):
        prune_model(model, {"hidden": torch.ones(7, dtype=torch.bool)})
    with pytest.raises(ValueError, match="bool"):
        prune_model(model, {"hidden": torch.ones(32)})
    with pytest.raises(ValueError, match="unknown mask kinds"):
        prune_model(model, {"neurons": torch.ones(32, dtype=torch.bool)})
    with pytest.raises(ValueError, match="every layer"):
        prune_model(model, {"layers": torch.zeros(3, dtype=torch.bool)})


def test_pruning_a_pruned_model_again(arch):
    model = make_model(arch)
    first = prune_model(model, _masks(model, ("heads", "ffn")))
    masks = full_masks(first)
    assert masks["heads"].sum(1).tolist() == [3, 4, 2]
    masks["heads"][1, 0] = False
    masks["ffn"][0, 0] = False
    _compare(first, masks)


def test_pruned_parameter_count_matches_the_pruned_model(arch):
    from lightning_kd.pruning import pruned_parameter_count

    model = make_model(arch)
    masks = full_masks(model)
    masks["heads"][:, 1] = False
    masks["ffn"][:, ::3] = False
    masks["hidden"][::4] = False
    masks["layers"][1] = False
    pruned = prune_model(model, masks)
    assert pruned_parameter_count(model, masks) == sum(p.numel() for p in pruned.parameters())


@pytest.mark.parametrize("kind", ["layernorm-no-bias", "rmsnorm", "llama-rmsnorm"])
def test_hidden_masks_renormalise_every_norm_kind_over_the_kept_dimensions(kind: str) -> None:
    """A norm masked to some hidden dimensions computes what the norm of the narrower model computes."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from lightning_kd.pruning.units import normalize_kept

    torch.manual_seed(0)
    norms = {
        "layernorm-no-bias": lambda width: torch.nn.LayerNorm(width, bias=False),
        "rmsnorm": lambda width: torch.nn.RMSNorm(width, eps=1e-6),
        "llama-rmsnorm": lambda width: LlamaRMSNorm(width, eps=1e-6),
    }
    full = norms[kind](12)
    with torch.no_grad():
        full.weight.normal_(1.0, 0.5)
    kept = torch.tensor([0, 3, 4, 7, 11])
    narrow = norms[kind](len(kept))
    with torch.no_grad():
        narrow.weight.copy_(full.weight[kept])
    x = torch.randn(2, 3, 12)
    assert torch.allclose(normalize_kept(full, x[..., kept], kept), narrow(x[..., kept]), atol=1e-6)
    assert not torch.allclose(full(x)[..., kept], narrow(x[..., kept]), atol=1e-3)  # the full norm differs


def test_a_norm_the_masks_do_not_know_is_refused_by_name() -> None:
    from lightning_kd.pruning.units import normalize_kept

    with pytest.raises(TypeError, match="cannot mask hidden dimensions through a GroupNorm"):
        normalize_kept(torch.nn.GroupNorm(2, 4), torch.randn(2, 4), torch.arange(4))
