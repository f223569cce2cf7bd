"""ETD extraction, importance scores and the errors for bad input."""

from __future__ import annotations

import sys

import pytest
import torch
from tiny_models import make_batch, make_model
from transformers import DistilBertConfig, DistilBertModel

from lightning_kd.models import get_adapter
from lightning_kd.pruning import (
    ActivationImportance,
    PlatonImportance,
    Sensitivity,
    extract,
    full_masks,
    prune_model,
    score_units,
    unit_counts,
    unit_sensitivity,
    zero_masked_,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlm_batches(model, count=2):
    batches = []
    for seed in range(count):
        batch = make_batch(model, seed=seed)
        batch["labels"] = batch["input_ids"].clone()
        batches.append(batch)
    return batches


@pytest.mark.parametrize("strategy", ["rand", "impt"])
def test_extract_gives_the_requested_shape(arch, strategy):
    teacher = make_model(arch)
    data = _mlm_batches(teacher) if strategy == "impt" else None
    student = extract(
        teacher,
        num_layers=2,
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=20,
        strategy=strategy,
        data=data,
    )
    assert type(student) is type(teacher)
    config = student.config
    assert (config.num_hidden_layers, config.hidden_size) == (2, 16)
    assert (config.num_attention_heads, config.intermediate_size) == (2, 20)
    counts = unit_counts(student)
    groups = 2 // get_adapter(teacher).queries_per_unit(teacher)  # units are key/value groups under GQA
    assert counts["heads"] == [groups, groups] and counts["ffn"] == [20, 20] and counts["head_size"] == 8
    assert all(p.requires_grad for p in student.parameters())
    out = student(**_mlm_batches(student, 1)[0])
    assert out.logits.shape[-1] == teacher.config.vocab_size and torch.isfinite(out.loss)


def test_extract_narrower_heads(arch):
    teacher = make_model(arch)
    adapter = get_adapter(teacher)
    if adapter.rotary and adapter.free_head_size:  # Llama-like: heads keep the size the config stores
        student = extract(teacher, hidden_size=16, num_attention_heads=4, strategy="rand")
        assert unit_counts(student)["head_size"] == 8 and student.config.num_attention_heads == 4
        assert student.config.num_key_value_heads == 2  # two whole key/value groups of two query heads
        with pytest.raises(ValueError, match="choose a multiple of 2"):
            extract(teacher, hidden_size=16, num_attention_heads=3, strategy="rand")
        # narrower heads through masks: a unit is a key/value group, whose query heads all keep the head size
        counts = unit_counts(teacher)
        head_dims = torch.ones(counts["layers"], counts["heads"][0], counts["head_size"], dtype=torch.bool)
        head_dims[:, :, 0] = False
        with pytest.raises(
            ValueError, match=r"remove whole groups \(masks\['heads'\]\) instead of narrowing"
        ):
            prune_model(teacher, {"head_dims": head_dims})
        return
    if adapter.rotary:  # rotary heads cannot be narrowed: refused, naming the head count to use
        with pytest.raises(ValueError, match=r"cannot be narrowed. Choose num_attention_heads=2"):
            extract(teacher, hidden_size=16, num_attention_heads=4, strategy="rand")
        assert unit_counts(extract(teacher, hidden_size=16, strategy="rand"))["heads"] == [2, 2, 2]
        return
    student = extract(teacher, hidden_size=16, num_attention_heads=4, strategy="rand")
    assert unit_counts(student)["head_size"] == 4
    assert student.config.num_attention_heads == 4
    assert torch.isfinite(student(**make_batch(student)).logits).all()


@pytest.mark.parametrize("strategy", ["rand", "impt"])
def test_extract_at_the_teachers_shape_is_the_teacher(arch, strategy):
    teacher = make_model(arch, "cls")
    data = [{**make_batch(teacher), "labels": torch.tensor([0, 2])}]
    heads = teacher.config.num_attention_heads
    student = extract(
        teacher, num_layers=3, hidden_size=32, num_attention_heads=heads, strategy=strategy, data=data
    )
    batch = make_batch(teacher)
    with torch.no_grad():
        assert torch.allclose(student(**batch).logits, teacher(**batch).logits, atol=1e-6)
    assert student.config.to_dict() == teacher.config.to_dict()


def test_extract_does_not_touch_the_teacher(arch):
    teacher = make_model(arch)
    teacher.requires_grad_(False)
    before = {name: p.clone() for name, p in teacher.named_parameters()}
    extract(
        teacher,
        num_layers=1,
        hidden_size=16,
        num_attention_heads=2,
        strategy="impt",
        data=_mlm_batches(teacher),
    )
    assert all(torch.equal(before[name], p) for name, p in teacher.named_parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden_size": 64}, r"larger than the teacher's 32"),
        ({"num_layers": 0}, "positive integer"),
        ({"num_attention_heads": 8}, r"larger than the teacher's 4"),
        ({"hidden_size": 30, "num_attention_heads": 4}, r"Nearest valid hidden sizes: \[28, 32\]"),
        ({"hidden_size": 32, "num_attention_heads": 2}, "at least 4 heads"),
        ({"strategy": "best"}, "choose 'rand' or 'impt'"),
        ({"strategy": "impt"}, "needs data"),
    ],
)
def test_extract_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        extract(make_model("bert"), **kwargs)


def test_unsupported_architecture_lists_the_supported_ones():
    model = DistilBertModel(DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=20))
    with pytest.raises(
        ValueError,
        match="Supported model types: bert, deberta-v2, llama, mistral, modernbert, qwen2, qwen3, roberta",
    ):
        extract(model, num_layers=1)
    with pytest.raises(ValueError, match="Supported model types"):
        full_masks(model)


def test_impt_needs_a_loss(arch):
    teacher = make_model(arch)
    with pytest.raises(ValueError, match="loss_fn"):
        extract(teacher, hidden_size=16, strategy="impt", data=[make_batch(teacher)])
    # a custom loss works with unlabeled batches
    student = extract(
        teacher,
        hidden_size=16,
        strategy="impt",
        data=[make_batch(teacher)],
        loss_fn=lambda model, batch: model(**batch).logits.logsumexp(-1).mean(),
    )
    assert student.config.hidden_size == 16


def _zero_units(model):
    """Zero one head, one FFN neuron and one hidden dimension everywhere; return their positions."""
    masks = full_masks(model)
    masks["heads"][1, 2] = False
    masks["ffn"][0, 7] = False
    masks["hidden"][5] = False
    zero_masked_(model, masks)
    return {"heads": (1, 2), "ffn": (0, 7), "hidden": (5,)}


@pytest.mark.parametrize("method", ["sensitivity", "platon", "activation"])
def test_zeroed_units_rank_last(arch, method):
    model = make_model(arch)
    zeroed = _zero_units(model)
    kwargs = {"beta1": 0.5, "beta2": 0.5} if method == "platon" else {}
    scores = score_units(model, _mlm_batches(model, 3), method=method, **kwargs)
    for kind, where in zeroed.items():
        row = scores[kind][where[0]] if len(where) == 2 else scores[kind]
        index = where[-1]
        assert row[index] == row.min() and (row > row[index]).sum() == len(row) - 1, (kind, row)


def test_zeroed_layer_ranks_last(arch):
    model = make_model(arch)
    # the first block: a zeroed block outputs a constant, so no gradient reaches the blocks below it
    zero_masked_(model, {"layers": torch.tensor([False, True, True])})
    scores = score_units(model, _mlm_batches(model, 2))["layers"]
    assert scores[0] == 0 and (scores[1:] > 0).all()


def test_scorers_fed_step_by_step_and_checkpointed(arch):
    model = make_model(arch)
    batches = _mlm_batches(model, 3)
    sensitivity, platon = Sensitivity(), PlatonImportance(0.8, 0.9)
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()
        sensitivity.update(model)
        platon.update(model)
    one_shot = score_units(model, batches, method="sensitivity")
    for kind in one_shot:
        assert torch.allclose(one_shot[kind], sensitivity.scores()[kind], rtol=1e-4)
    restored = PlatonImportance(0.8, 0.9)
    restored.load_state_dict(platon.state_dict())
    assert all(torch.equal(restored.scores()[k], v) for k, v in platon.scores().items())
    restored.update(model)
    platon.update(model)
    assert all(torch.equal(restored.scores()[k], v) for k, v in platon.scores().items())


def test_activation_scorer_as_hooks(arch):
    model = make_model(arch)
    scorer = ActivationImportance(model)
    with torch.no_grad():
        model(**make_batch(model))
    scorer.update(model)
    scorer.detach()
    scores = scorer.scores()
    assert scores["heads"].shape == (3, 4) and (scores["ffn"] > 0).all()


def test_sensitivity_of_a_pruned_model_has_padded_rows(arch):
    model = make_model(arch)
    masks = full_masks(model)
    masks["heads"][0, :2] = False
    pruned = prune_model(model, masks)
    pruned(**_mlm_batches(pruned, 1)[0]).loss.backward()
    scores = unit_sensitivity(pruned)
    assert scores["heads"].shape == (3, 4) and scores["heads"][0, 2:].eq(0).all()
    assert scores["heads"][1].gt(0).all()


def test_random_scores_are_reproducible(arch):
    model = make_model(arch)
    first, second = score_units(model, method="random", seed=3), score_units(model, method="random", seed=3)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_every_head_keeps_its_own_best_dimensions(arch, monkeypatch):
    teacher = make_model(arch)
    if get_adapter(teacher).rotary:
        pytest.skip("rotary heads keep every dimension (test_extract_narrower_heads checks the refusal)")
    counts = unit_counts(teacher)
    heads, size, width = max(counts["heads"]), counts["head_size"], 2 * max(counts["heads"])
    # head h prefers dimensions h and h + 1: a choice shared by all heads of a layer cannot honour that
    wanted = {h: [h % size, (h + 1) % size] for h in range(heads)}
    real = score_units

    def scripted(model, data=None, method="sensitivity", **kwargs):
        scores = real(model, method="random", seed=0)
        scores["head_dims"] = 0.01 * scores["head_dims"]
        for h, dims in wanted.items():
            scores["head_dims"][:, h, dims] += 1.0
        scores["hidden"] = -torch.arange(counts["hidden"], dtype=torch.float)  # keep hidden dims 0..width-1
        return scores

    monkeypatch.setattr(sys.modules["lightning_kd.pruning.extract"], "score_units", scripted)
    student = extract(
        teacher, hidden_size=width, num_attention_heads=heads, strategy="impt", data=_mlm_batches(teacher)
    )
    assert unit_counts(student)["head_size"] == 2
    value_t = get_adapter(teacher).layer_parts(get_adapter(teacher).layers(teacher)[0]).value.weight
    value_s = get_adapter(student).layer_parts(get_adapter(student).layers(student)[0]).value.weight
    for h, dims in wanted.items():
        rows = [h * size + d for d in sorted(dims)]
        assert torch.equal(value_s[2 * h : 2 * h + 2], value_t[rows][:, :width]), h
