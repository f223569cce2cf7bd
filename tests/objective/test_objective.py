"""Each knowledge term against values computed by hand, padding, projections and layer maps."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_kd.objective import (
    TERMS,
    DistillationObjective,
    Features,
    ModelInfo,
    build_term,
    resolve_layer_map,
)


def info(**kw: object) -> ModelInfo:
    settings = dict(num_layers=4, hidden_size=16, num_heads=4, vocab_size=64, predicts=True)
    settings.update(kw)
    return ModelInfo(**settings)


def bound(spec: dict, teacher: ModelInfo | None = None, student: ModelInfo | None = None):
    term = build_term(spec)
    term.bind(teacher or info(), student or info())
    return term


def test_prediction_kl_matches_hand_computation_with_temperature() -> None:
    teacher = Features(logits=torch.tensor([[math.log(3.0), 0.0]]))
    student = Features(logits=torch.zeros(1, 2))
    batch = {"attention_mask": torch.ones(1, 1)}
    # T = 1: p_t = (3/4, 1/4) against the uniform student
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert bound({"term": "logits"})(teacher, student, batch).item() == pytest.approx(expected, abs=1e-6)
    # T = 2: p_t = softmax(ln3 / 2, 0), and the KL is scaled by T^2 = 4
    a = math.sqrt(3.0) / (math.sqrt(3.0) + 1)
    expected_t2 = 4 * (a * math.log(2 * a) + (1 - a) * math.log(2 * (1 - a)))
    value = bound({"term": "logits", "temperature": 2.0})(teacher, student, batch)
    assert value.item() == pytest.approx(expected_t2, abs=1e-6)


def test_logits_kl_is_refused_on_a_regression_head_and_mse_matches_the_scores() -> None:
    regression = info(num_outputs=1)
    for spec in ({"term": "logits"}, {"term": "logits", "loss": "kl", "temperature": 2.0}):
        with pytest.raises(ValueError, match="identically 0 on a one-output.*loss: mse"):
            bound(spec, regression, regression)
    with pytest.raises(ValueError, match="no temperature"):
        build_term({"term": "logits", "loss": "mse", "temperature": 2.0})
    term = bound({"term": "logits", "loss": "mse"}, regression, regression)
    assert term.name == "logits_mse"
    teacher, student = (
        Features(logits=torch.tensor([[1.0], [3.0]])),
        Features(logits=torch.tensor([[2.0], [0.0]])),
    )
    # scores 1, 3 against 2, 0: ((1)^2 + (3)^2) / 2
    assert term(teacher, student, {"attention_mask": torch.ones(2, 1)}).item() == pytest.approx(5.0)


def test_logits_term_refuses_heads_of_different_widths() -> None:
    for loss in ("kl", "mse"):
        with pytest.raises(ValueError, match="teacher predicts 3 outputs and the student 1"):
            bound({"term": "logits", "loss": loss}, info(num_outputs=3), info(num_outputs=1))


def test_logits_mse_on_class_logits_averages_classes_then_rows() -> None:
    term = bound({"term": "logits", "loss": "mse"})
    teacher = Features(logits=torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]]))
    student = Features(logits=torch.tensor([[1.0, 3.0, -1.0], [1.0, 1.0, 1.0]]))
    # row 0: 9 / 3 = 3, row 1: 3 / 3 = 1
    assert term(teacher, student, {"attention_mask": torch.ones(2, 1)}).item() == pytest.approx(2.0)


def test_prediction_kl_reads_only_masked_mlm_positions_and_never_padding() -> None:
    torch.manual_seed(0)
    t, s = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    labels[0, 1] = 3
    labels[1, 2] = 4
    batch = {"attention_mask": torch.ones(2, 5), "labels": labels}
    term = bound({"term": "logits"})
    before = term(Features(logits=t), Features(logits=s), batch)
    s2 = s.clone()
    s2[0, 0] += 10.0  # an unmasked position: MLM's loss does not read it
    s2[1, 4] -= 10.0
    assert term(Features(logits=t), Features(logits=s2), batch).item() == pytest.approx(
        before.item(), abs=1e-6
    )
    # without MLM labels: every real token counts, padding does not
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    before = term(Features(logits=t), Features(logits=s), batch)
    s3 = s.clone()
    s3[0, 3:] += 10.0
    assert term(Features(logits=t), Features(logits=s3), batch).item() == pytest.approx(
        before.item(), abs=1e-6
    )


def test_hidden_mse_and_cosine_by_hand_with_padding_ignored() -> None:
    mask = torch.tensor([[1, 1, 0]])
    teacher_h = torch.zeros(1, 3, 4)
    student_h = torch.ones(1, 3, 4)
    student_h[0, 2] = 100.0  # padding
    teacher = Features(hidden_states=(teacher_h,) * 5)
    student = Features(hidden_states=(student_h,) * 5)
    small = info(hidden_size=4)
    mse = bound({"term": "hidden", "loss": "mse", "layers": "last_layer"}, small, small)
    assert mse(teacher, student, {"attention_mask": mask}).item() == pytest.approx(1.0)
    teacher_h = torch.tensor([[[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1.0]]])
    student_h = torch.tensor([[[0, 1.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, -5.0]]])
    cosine = bound({"term": "hidden", "loss": "cosine", "layers": "last_layer"}, small, small)
    value = cosine(
        Features(hidden_states=(teacher_h,) * 5),
        Features(hidden_states=(student_h,) * 5),
        {"attention_mask": mask},
    )
    assert value.item() == pytest.approx((1.0 + 0.0) / 2)  # orthogonal, then parallel


def test_projection_learns_a_width_change() -> None:
    torch.manual_seed(0)
    map_ = torch.randn(8, 12)
    term = bound(
        {"term": "hidden", "layers": [[1, 1]]},
        info(hidden_size=12, num_layers=1),
        info(hidden_size=8, num_layers=1),
    )
    assert isinstance(term.projections[0], torch.nn.Linear)
    optimizer = torch.optim.Adam(term.parameters(), lr=0.05)
    mask = torch.ones(4, 6)
    losses = []
    for _ in range(300):
        s = torch.randn(4, 6, 8)
        target = s @ map_
        loss = term(
            Features(hidden_states=(target, target)), Features(hidden_states=(s, s)), {"attention_mask": mask}
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 1e-3 * losses[0]


def test_embeddings_term_reads_hidden_state_zero() -> None:
    term = bound({"term": "embeddings"})
    assert term.pairs == [(0, 0)] and term.name == "embeddings_mse"


def attention(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows).view(1, 1, len(rows), len(rows))


def test_attention_kl_and_mse_by_hand() -> None:
    # two real tokens and one padding token whose row and column must not count
    t = attention([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    s = attention([[0.25, 0.75, 0.0], [0.5, 0.5, 0.0], [0.9, 0.1, 0.0]])
    batch = {"attention_mask": torch.tensor([[1, 1, 0]])}
    one = info(num_layers=1, num_heads=1)
    kl = bound({"term": "attention", "loss": "kl", "layers": "last_layer"}, one, one)
    row1 = 0.5 * math.log(2.0) + 0.5 * math.log(0.5 / 0.75)
    row2 = math.log(2.0)
    assert kl(Features(attentions=(t,)), Features(attentions=(s,)), batch).item() == pytest.approx(
        (row1 + row2) / 2, abs=1e-6
    )
    mse = bound({"term": "attention", "loss": "mse", "layers": "last_layer"}, one, one)
    expected = (0.25**2 * 2 + 0.5**2 * 2) / 4
    assert mse(Features(attentions=(t,)), Features(attentions=(s,)), batch).item() == pytest.approx(expected)


def test_attention_refuses_different_head_counts() -> None:
    with pytest.raises(ValueError, match="relations"):
        bound({"term": "attention"}, info(num_heads=4), info(num_heads=2))


def test_relations_by_hand() -> None:
    one = info(num_layers=1, hidden_size=1, num_heads=1)
    term = bound({"term": "relations", "relations": ["qq"], "num_relation_heads": 1}, one, one)
    teacher = Features(qkv={1: {"query": torch.tensor([[[1.0], [0.0], [7.0]]])}})
    student = Features(qkv={1: {"query": torch.zeros(1, 3, 1)}})
    batch = {"attention_mask": torch.tensor([[1, 1, 0]])}
    p = math.e / (math.e + 1)
    row1 = p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))
    assert term(teacher, student, batch).item() == pytest.approx(row1 / 2, abs=1e-6)


def test_relations_work_across_head_counts_and_widths() -> None:
    teacher_info = info(hidden_size=16, num_heads=4)
    student_info = info(hidden_size=8, num_heads=2, num_layers=2)
    term = bound({"term": "relations", "num_relation_heads": 4}, teacher_info, student_info)
    assert term.pairs == [(2, 4)]
    torch.manual_seed(0)
    qkv_t = {r: torch.randn(2, 5, 16) for r in ("query", "key", "value")}
    qkv_s = {r: torch.randn(2, 5, 8) for r in ("query", "key", "value")}
    value = term(Features(qkv={4: qkv_t}), Features(qkv={2: qkv_s}), {"attention_mask": torch.ones(2, 5)})
    assert torch.isfinite(value) and value > 0
    same = term(Features(qkv={4: qkv_t}), Features(qkv={2: qkv_t}), {"attention_mask": torch.ones(2, 5)})
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="divide"):
        bound({"term": "relations", "num_relation_heads": 3}, teacher_info, student_info)


def test_task_loss_classification_and_regression() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    term = bound({"term": "task"})
    value = term(Features(), Features(logits=logits), {"labels": torch.tensor([0, 1])})
    assert value.item() == pytest.approx((math.log(2.0) + math.log(4.0)) / 2, abs=1e-6)
    scores = torch.tensor([[1.0], [3.0]])
    value = term(Features(), Features(logits=scores), {"labels": torch.tensor([2.0, 3.0])})
    assert value.item() == pytest.approx(0.5)


def test_layer_maps() -> None:
    assert resolve_layer_map("uniform", 2, 4, with_embeddings=True) == [(0, 0), (1, 2), (2, 4)]
    assert resolve_layer_map("uniform", 3, 12, with_embeddings=False) == [(1, 4), (2, 8), (3, 12)]
    # KD revisited's strategies pair all M student layers; the single-pair maps say so in their names
    assert resolve_layer_map("first", 3, 12, with_embeddings=False) == [(1, 1), (2, 2), (3, 3)]
    assert resolve_layer_map("last", 3, 12, with_embeddings=False) == [(1, 10), (2, 11), (3, 12)]
    assert resolve_layer_map("first_layer", 3, 12, with_embeddings=False) == [(1, 1)]
    assert resolve_layer_map("last_layer", 3, 12, with_embeddings=False) == [(3, 12)]
    with pytest.raises(ValueError, match="'last' pairs each of the student's 4 layers .* teacher has only 3"):
        resolve_layer_map("last", 4, 3, with_embeddings=True)
    assert resolve_layer_map([[1, 6], [3, 12]], 3, 12, with_embeddings=False) == [(1, 6), (3, 12)]
    with pytest.raises(ValueError, match="teacher layer 13"):
        resolve_layer_map([[1, 13]], 3, 12, with_embeddings=False)
    with pytest.raises(ValueError, match="student layer 0"):
        resolve_layer_map([[0, 1]], 3, 12, with_embeddings=False)
    with pytest.raises(ValueError, match="first, last, uniform"):
        resolve_layer_map("middle", 3, 12, with_embeddings=False)


def test_objective_weights_terms_and_reports_each() -> None:
    objective = DistillationObjective([{"term": "logits", "weight": 2.0}, {"term": "task", "weight": 0.5}])
    objective.bind(info(), info())
    teacher = Features(logits=torch.tensor([[math.log(3.0), 0.0]]))
    student = Features(logits=torch.zeros(1, 2))
    total, values = objective(
        teacher, student, {"attention_mask": torch.ones(1, 1), "labels": torch.tensor([0])}
    )
    assert set(values) == {"logits_kl", "task"}
    assert total.item() == pytest.approx(2.0 * values["logits_kl"].item() + 0.5 * math.log(2.0), abs=1e-6)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"term": "telepathy"}, "known terms are "),  # all of them, as registered when the test runs
        ({"term": "hidden", "weight": -1.0}, "weights must be finite and >= 0"),
        ({"term": "hidden", "weight": float("nan")}, "weights must be finite and >= 0"),
        ({"term": "hidden", "loss": "l7"}, "choose one of mse, cosine"),
        ({"term": "hidden", "colour": "red"}, "colour"),
    ],
)
def test_bad_terms_are_named(spec: dict, message: str) -> None:
    if (
        message == "known terms are "
    ):  # other packages (TED) register terms when imported: read the registry now
        message += ", ".join(sorted(TERMS))
    with pytest.raises(ValueError, match=message):
        DistillationObjective([spec])


def test_duplicate_term_names_are_refused() -> None:
    with pytest.raises(ValueError, match="distinct `name`"):
        DistillationObjective([{"term": "hidden"}, {"term": "hidden"}])
    DistillationObjective(
        [{"term": "hidden"}, {"term": "hidden", "layers": "last_layer", "name": "hidden_top"}]
    )


def test_logits_term_needs_prediction_heads() -> None:
    with pytest.raises(ValueError, match="no prediction head"):
        bound({"term": "logits"}, info(predicts=False), info())


@pytest.mark.parametrize("projection", [None, True])
def test_narrowing_the_student_width_keeps_the_hidden_term_exact(projection: bool | None) -> None:
    term = bound(
        {"term": "hidden", "layers": "last_layer", "projection": projection},
        info(hidden_size=6, num_layers=1),
        info(hidden_size=6, num_layers=1),
    )
    torch.manual_seed(0)
    kept = torch.tensor([0, 2, 3])
    masked_student = torch.randn(2, 4, 6)
    masked_student[..., [1, 4, 5]] = 0.0  # what a hidden-dimension mask leaves in the residual stream
    teacher = Features(hidden_states=(torch.randn(2, 4, 6),) * 2)
    batch = {"attention_mask": torch.ones(2, 4)}
    before = term(teacher, Features(hidden_states=(masked_student,) * 2), batch)
    term.narrow_student_width(kept)
    after = term(teacher, Features(hidden_states=(masked_student[..., kept],) * 2), batch)
    assert after.item() == pytest.approx(before.item(), abs=1e-6)
