"""The layer terms ('hidden', 'attention', 'relations') on decoders distilled with task="causal-lm": zero for a
copy, positive and finite for a shallower or narrower student, gradients into the student, attention maps per
query head, and MiniLMv2 relations under grouped-query attention (keys and values narrower than queries)."""

from __future__ import annotations

import math

import pytest
import torch
from test_causal_lm import causal_batch
from tiny_models import make_model

from lightning_kd import DistillationModule

pytestmark = pytest.mark.usefixtures("one_thread")

TERMS = [{"term": "hidden"}, {"term": "attention"}, {"term": "relations"}]
# 2 of 3 blocks, as wide as the teacher: every term applies, the attention maps pair head by head
SHALLOWER = {"init": "layers", "num_layers": 2}
# 2 blocks, half the residual stream, 2 of 4 key/value groups (4 query heads): the teacher's 8 query heads no
# longer match, so the attention term is left out; hidden states go through a learned projection
NARROWER = {
    "init": "extract",
    "num_layers": 2,
    "hidden_size": 16,
    "num_attention_heads": 4,
    "intermediate_size": 24,
    "strategy": "rand",
}


def term_values(module: DistillationModule, seed: int = 0) -> dict[str, torch.Tensor]:
    batch = module.prepare_batch(causal_batch(seed=seed))
    return module.losses(module.teacher_features(batch), module.student_features(batch), batch)[1]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_a_copy_of_the_teacher_scores_zero_on_every_layer_term(arch: str) -> None:
    module = DistillationModule(make_model(arch), {"init": "copy"}, task="causal-lm", objective=TERMS)
    values = term_values(module)
    assert set(values) == {"hidden_mse", "attention_kl", "relations_kl"}
    for name, value in values.items():
        assert abs(value.item()) < 1e-6, (name, value)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("student", ["shallower", "narrower"])
def test_a_smaller_student_scores_positive_finite_terms_whose_gradients_reach_it(
    arch: str, student: str
) -> None:
    spec = SHALLOWER if student == "shallower" else NARROWER
    objective = TERMS if student == "shallower" else [TERMS[0], TERMS[2]]
    module = DistillationModule(make_model(arch), spec, task="causal-lm", objective=objective)
    values = term_values(module)
    assert set(values) == {f"{t['term']}_{'mse' if t['term'] == 'hidden' else 'kl'}" for t in objective}
    last = module.student.model.layers[-1].self_attn
    reached = {  # what each term reads, in the student, must receive its gradient
        "hidden_mse": [module.student.model.embed_tokens.weight],
        "attention_kl": [last.q_proj.weight, last.k_proj.weight],
        "relations_kl": [last.q_proj.weight, last.k_proj.weight, last.v_proj.weight],
    }
    for name, value in values.items():
        assert torch.isfinite(value) and value.item() > 1e-3, (name, value)
        module.student.zero_grad(set_to_none=True)
        value.backward(retain_graph=True)
        for parameter in reached[name]:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in module.teacher.parameters())
    if student == "narrower":  # the learned projection into the teacher's width learns too
        projection = module.objective.terms["hidden_mse"].projections[0]
        assert projection.weight.shape == (32, 16) and projection.weight.grad.abs().sum() > 0


def _eager_maps(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True
        )
    return out.attentions


def test_the_attention_term_matches_maps_per_query_head_across_key_value_group_counts() -> None:
    teacher = make_model("llama")  # 8 query heads in 4 groups
    # 8 query heads in 2 groups: the maps still pair head by head, since each query head has its own map
    student = {"init": "config", "config": {"num_key_value_heads": 2}}
    module = DistillationModule(teacher, student, task="causal-lm", objective=[{"term": "attention"}])
    assert teacher.config._attn_implementation == "eager"  # switched so the forward returns the maps
    batch = module.prepare_batch(causal_batch())
    value = term_values(module)["attention_kl"]
    teacher_maps, student_maps = _eager_maps(teacher, batch), _eager_maps(module.student, batch)
    assert teacher_maps[0].shape == student_maps[0].shape == (4, 8, 12, 12)
    real = batch["attention_mask"].bool()
    expected = []
    for t, s in zip(
        teacher_maps, student_maps, strict=True
    ):  # uniform map over 3 and 3 blocks: 1-1, 2-2, 3-3
        rows = (torch.special.xlogy(t, t) - t * s.clamp_min(1e-12).log()).sum(-1)  # [B, heads, T]
        expected.append(rows.permute(0, 2, 1)[real].mean())
    assert value.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    assert value.item() > 1e-3
    with pytest.raises(ValueError, match="teacher has 8 heads and the student 4.*'relations' term"):
        DistillationModule(make_model("llama"), NARROWER, task="causal-lm", objective=[{"term": "attention"}])


def _keys(model: torch.nn.Module, batch: dict, layer: int) -> torch.Tensor:
    kept = []
    handle = model.model.layers[layer].self_attn.k_proj.register_forward_hook(lambda m, i, o: kept.append(o))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    return kept[0]


def _key_relations(keys: torch.Tensor, heads: int, real: torch.Tensor) -> torch.Tensor:
    batch, length, width = keys.shape
    size = width // heads
    k = keys.view(batch, length, heads, size).transpose(1, 2)
    scores = (k @ k.transpose(-1, -2) / math.sqrt(size)).masked_fill(~real[:, None, None, :], -1e30)
    return scores.log_softmax(-1)


def test_key_relations_split_the_narrower_keys_into_the_same_relation_heads() -> None:
    teacher = make_model("llama")  # queries 8 x 8 = 64 wide, keys and values 4 x 8 = 32
    module = DistillationModule(
        teacher, NARROWER, task="causal-lm", objective=[{"term": "relations", "relations": ["kk"]}]
    )
    assert module.objective.terms["relations_kl"].num_relation_heads == 8  # the teacher's query heads
    batch = module.prepare_batch(causal_batch())
    real = batch["attention_mask"].bool()
    # last layer to last layer (MiniLMv2's map): keys of 32 and 16 dimensions, 8 heads of 4 and of 2
    t = _key_relations(_keys(teacher, batch, 2), 8, real)
    s = _key_relations(_keys(module.student, batch, 1), 8, real)
    rows = (t.exp() * (t - s)).sum(-1)
    expected = rows.permute(0, 2, 1)[real].mean()
    assert term_values(module)["relations_kl"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_relation_heads_that_do_not_divide_a_key_or_value_width_are_refused_when_bound() -> None:
    one_group = {
        **NARROWER,
        "hidden_size": 32,
        "num_attention_heads": 2,
    }  # queries 16 wide, keys and values 8
    with pytest.raises(ValueError) as refused:
        DistillationModule(
            make_model("llama"),
            one_group,
            task="causal-lm",
            objective=[{"term": "relations", "num_relation_heads": 16}],
        )
    message = str(refused.value)
    assert "student layer 2 key: 8, student layer 2 value: 8" in message
    assert "grouped-query attention" in message and "num_relation_heads to one of [1, 2, 4, 8]" in message
    assert " query:" not in message  # the queries, 64 and 16 wide, do divide
    # the queries alone divide into 16 heads, and the term then runs
    module = DistillationModule(
        make_model("llama"),
        one_group,
        task="causal-lm",
        objective=[{"term": "relations", "relations": ["qq"], "num_relation_heads": 16}],
    )
    value = term_values(module)["relations_kl"]
    assert torch.isfinite(value) and value.item() > 0


def test_a_cross_relation_is_refused_at_construction_with_the_reason() -> None:
    with pytest.raises(ValueError, match=r"Cross relations \(qk\) are not offered.*'attention' term"):
        DistillationModule(
            make_model("llama"),
            {"init": "copy"},
            task="causal-lm",
            objective=[{"term": "relations", "relations": ["qq", "qk"]}],
        )
