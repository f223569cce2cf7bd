"""TED stage II's filtered MSE: over real tokens only (`tokens`) or over every padded position (`authors`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ted_helpers import quiet_trainer, tiny_classifier

from lightning_kd import DistillationModule
from lightning_kd.objective.term import Features, ModelInfo
from lightning_kd.ted import FilteredHidden
from lightning_kd.ted.callback import TEDFilterCallback
from lightning_kd.ted.filters import LayerFilters, save_filters

WIDTH = 2
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # 6 real tokens, 2 padding positions


def _info(layers: int) -> ModelInfo:
    return ModelInfo(num_layers=layers, hidden_size=WIDTH, num_heads=1, vocab_size=8, predicts=True)


def _identity_filters(layers: list[int]) -> LayerFilters:
    filters = LayerFilters(layers, WIDTH, WIDTH)
    with torch.no_grad():
        for linear in filters.filters:
            linear.weight.copy_(torch.eye(WIDTH))
            linear.bias.zero_()
    return filters


def _term(normalize: str) -> FilteredHidden:
    term = FilteredHidden(interval=1, normalize=normalize)
    term.bind(_info(2), _info(2))
    term.use_stage_one_filters(_identity_filters([1, 2]), _identity_filters([1, 2]))
    return term


def _padded_states() -> tuple[Features, Features]:
    """Teacher states 0; student states 1 on real tokens and 3 on padding (squared errors 1 and 9)."""
    student = torch.where(MASK.bool()[..., None], 1.0, 3.0).expand(2, 4, WIDTH)
    zeros = torch.zeros(2, 4, WIDTH)
    return Features(hidden_states=(zeros, zeros, zeros)), Features(hidden_states=(zeros, student, student))


def test_known_values_on_a_padded_batch() -> None:
    teacher, student = _padded_states()
    batch = {"attention_mask": MASK}
    assert _term("tokens")(teacher, student, batch).item() == pytest.approx(1.0)
    # authors: (6 real x 1 + 2 padding x 9) / 8 positions, as F.mse_loss(reduction="mean") over the padded batch
    assert _term("authors")(teacher, student, batch).item() == pytest.approx(24 / 8)


def test_authors_is_the_published_average_over_layers() -> None:
    generator = torch.Generator().manual_seed(0)
    states_t = tuple(torch.randn(2, 4, WIDTH, generator=generator) for _ in range(3))
    states_s = tuple(torch.randn(2, 4, WIDTH, generator=generator) for _ in range(3))
    value = _term("authors")(
        Features(hidden_states=states_t), Features(hidden_states=states_s), {"attention_mask": MASK}
    )
    published = sum(F.mse_loss(states_s[i], states_t[i], reduction="mean") for i in (1, 2)) / 2
    assert value.item() == pytest.approx(published.item(), rel=1e-6)
    tokens = _term("tokens")(
        Features(hidden_states=states_t), Features(hidden_states=states_s), {"attention_mask": MASK}
    )
    assert tokens.item() != pytest.approx(value.item())  # the padding of this batch moves the average


def test_the_callback_passes_normalize_and_refuses_unknown_values(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown TED normalize 'padding'.*'authors'"):
        TEDFilterCallback(stage="distill", filters=str(tmp_path), normalize="padding")
    with pytest.raises(ValueError, match="normalize must be one of tokens, authors"):
        FilteredHidden(normalize="all")
    save_filters(tmp_path / "teacher.pt", LayerFilters([2, 4], 16, 16))
    save_filters(tmp_path / "student.pt", LayerFilters([1, 2], 8, 16))
    teacher, student = tiny_classifier(layers=4, hidden=16), tiny_classifier(layers=2, hidden=8, seed=1)
    module = DistillationModule(
        teacher, student, objective=[{"term": "task"}], task="sequence-classification"
    )
    callback = TEDFilterCallback(
        stage="distill", filters=str(tmp_path), interval=2, normalize="authors", num_labels=3
    )
    callback.setup(quiet_trainer(), module, "fit")
    assert module.objective.terms["ted"].normalize == "authors"
    assert callback.state_dict()["normalize"] == "authors"
    with pytest.warns(UserWarning, match="normalize='tokens'.*'authors'"):
        callback.load_state_dict({**callback.state_dict(), "normalize": "tokens"})
