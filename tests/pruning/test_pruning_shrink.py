"""Shrinking in place while training: a shrunk model and its optimizer continue exactly as the masked model."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_batch, make_model

from lightning_kd.pruning import (
    PlatonImportance,
    apply_masks,
    full_masks,
    masked_parameter_slices,
    prune_model,
    unit_counts,
    zero_masked_,
)
from lightning_kd.pruning.prune import prune_model_
from lightning_kd.pruning.shrink import (
    expand_scores,
    rebuild_shape_,
    reindex_optimizer_,
    relative_masks,
    student_shape,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# eps well above float noise: key biases get gradients that are zero up to rounding (softmax ignores them), and
# Adam would blow that noise up to full-size steps that differ between any two ways of computing the same thing
OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, eps=1e-4),
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, eps=1e-4, fused=True),
    "adam-foreach": lambda params: torch.optim.Adam(params, lr=1e-2, eps=1e-4, foreach=True),
    "adam-amsgrad": lambda params: torch.optim.Adam(params, lr=1e-2, eps=1e-4, amsgrad=True, foreach=False),
}


def _events(model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    """Two nested events in full coordinates, with layers that keep different numbers of heads and neurons."""
    first = full_masks(model)
    first["heads"][0, 1] = False
    first["ffn"][1, ::3] = False
    first["hidden"][::4] = False
    second = {kind: mask.clone() for kind, mask in first.items()}
    second["heads"][2, [0, 3]] = False
    second["ffn"][0, :5] = False
    second["hidden"][1::8] = False
    return [{k: v for k, v in masks.items() if k != "layers"} for masks in (first, second)]


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, slices: list) -> None:
    optimizer.zero_grad(set_to_none=True)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    with torch.no_grad():
        for piece in slices:  # what PruningCallback(physical=False) does before every step
            piece.parameter.grad.index_fill_(piece.dim, piece.index, 0.0)
    optimizer.step()


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_shrunk_model_and_optimizer_continue_like_the_masked_ones(arch: str, optimizer: str) -> None:
    masked_model, shrunk = make_model(arch).train(), make_model(arch).train()
    masked_opt, shrunk_opt = (
        OPTIMIZERS[optimizer](masked_model.parameters()),
        OPTIMIZERS[optimizer](shrunk.parameters()),
    )
    batch = make_batch(masked_model)
    handle, slices, old = None, [], full_masks(shrunk)
    for masks in _events(shrunk):
        for _ in range(2):
            _step(masked_model, masked_opt, batch, slices)
            _step(shrunk, shrunk_opt, batch, [])
        # the masked run: hooks, zero weights, zero optimizer state of the removed units
        if handle is not None:
            handle.remove()
        handle = apply_masks(masked_model, masks)
        zero_masked_(masked_model, masks)
        slices = masked_parameter_slices(masked_model, masks)
        for piece in slices:
            for value in masked_opt.state[piece.parameter].values():
                if value.shape == piece.parameter.shape:
                    value.index_fill_(piece.dim, piece.index, 0.0)
        # the shrunk run: surgery in place and its optimizer re-indexed
        resizes = prune_model_(shrunk, relative_masks(masks, {k: old[k] for k in masks}))
        reindex_optimizer_(shrunk_opt, resizes)
        old = {**old, **masks}
    for _ in range(2):
        _step(masked_model, masked_opt, batch, slices)
        _step(shrunk, shrunk_opt, batch, [])

    assert {id(p) for g in shrunk_opt.param_groups for p in g["params"]} == {
        id(p) for p in shrunk.parameters()
    }
    assert all(float(state["step"]) == 6 for state in shrunk_opt.state.values())
    expected = prune_model(masked_model, masks)
    handle.remove()
    assert student_shape(expected) == student_shape(shrunk)
    if shrunk.config.tie_word_embeddings:
        assert shrunk.get_input_embeddings().weight is shrunk.get_output_embeddings().weight  # still tied
    for (name, a), b in zip(expected.state_dict().items(), shrunk.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), (name, (a - b).abs().max())
    # the state of the kept units is the masked run's state at their positions
    kept = old["hidden"].nonzero().flatten()
    masked_state = masked_opt.state[masked_model.get_input_embeddings().weight]["exp_avg"]
    shrunk_state = shrunk_opt.state[shrunk.get_input_embeddings().weight]["exp_avg"]
    assert torch.allclose(masked_state[:, kept], shrunk_state, atol=1e-6)


def test_statistics_follow_the_kept_units() -> None:
    model = make_model("bert").train()
    scorer = PlatonImportance(kinds=["heads", "ffn", "hidden"])
    model(**make_batch(model), labels=make_batch(model)["input_ids"]).loss.backward()
    scorer.update(model)
    before = scorer.scores()
    masks = _events(model)[0]
    scorer.keep_units(relative_masks(masks, full_masks(model)))
    prune_model_(model, masks)
    after = scorer.scores()
    for kind, mask in masks.items():
        # in the shrunk model's layout, and back at the full positions they came from
        assert after[kind].shape[-1] == (
            max(unit_counts(model)[kind]) if kind != "hidden" else int(mask.sum())
        )
        full = expand_scores(after[kind], mask)
        assert torch.equal(full[mask], before[kind][mask])
        assert torch.isinf(full[~mask]).all()


def test_a_checkpointed_shape_is_rebuilt_before_the_weights_load(arch: str) -> None:
    shrunk = make_model(arch)
    prune_model_(shrunk, _events(shrunk)[1])
    fresh = make_model(arch, seed=1)
    kept = rebuild_shape_(fresh, student_shape(shrunk))
    assert kept is not None and len(kept) == shrunk.config.hidden_size
    fresh.load_state_dict(shrunk.state_dict())
    batch = make_batch(shrunk)
    assert torch.allclose(fresh(**batch).logits, shrunk(**batch).logits, atol=1e-6)
    assert rebuild_shape_(fresh, student_shape(shrunk)) is None  # already that shape
    with pytest.raises(ValueError, match="cannot hold"):
        rebuild_shape_(make_model(arch), {**student_shape(shrunk), "heads": [5, 1, 1]})
