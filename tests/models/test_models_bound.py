"""A model is bound to its adapter once per public call, and the bound view stays right through surgery."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
import torch
from tiny_models import make_batch, make_model
from torch import nn

from lightning_kd.models import registry
from lightning_kd.models.bound import BoundModel, bind, try_bind, unbind
from lightning_kd.models.capture import capture_qkv
from lightning_kd.models.info import masked_lm_parts, model_info
from lightning_kd.models.layers import keep_layers_, max_sequence_length, select_layers
from lightning_kd.pruning.export import check_exportable, load_pruned, save_standard, to_standard
from lightning_kd.pruning.extract import extract
from lightning_kd.pruning.importance import PlatonImportance, Sensitivity, score_units
from lightning_kd.pruning.prune import prune_model, prune_model_, pruned_parameter_count
from lightning_kd.pruning.sensitivity import unit_sensitivity
from lightning_kd.pruning.shrink import (
    plain_dropout_,
    rebuild_shape_,
    shape_masks,
    student_shape,
    widen_dropout_,
)
from lightning_kd.pruning.units import (
    apply_masks,
    axes,
    full_masks,
    layer_parameters,
    masked_parameter_slices,
    unit_counts,
    validate_masks,
    zero_masked_,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def resolutions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ``get_adapter`` call from now on, under whichever name a lightning_kd module holds it."""
    calls: list[str] = []
    real = registry.get_adapter

    def counting(model: nn.Module):
        calls.append(type(model).__name__)
        return real(model)

    monkeypatch.setattr(registry, "get_adapter", counting)
    for name, module in list(sys.modules.items()):
        if name.startswith("lightning_kd") and vars(module).get("get_adapter") is real:
            monkeypatch.setattr(module, "get_adapter", counting)
    return calls


def _ragged_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Layers that keep different numbers of heads and neurons, a narrower width, one layer less."""
    masks = full_masks(model)
    masks["heads"][0, 1] = False
    masks["heads"][2, :2] = False
    masks["ffn"][2, ::3] = False
    masks["hidden"][::4] = False
    masks["layers"][1] = False
    return masks


def _shrunk_shape(model: nn.Module) -> dict:
    """The shape of a shrunk copy of ``model`` that has all its layers (a checkpoint's, to rebuild)."""
    masks = {kind: mask for kind, mask in _ragged_masks(model).items() if kind != "layers"}
    return student_shape(prune_model(model, masks))


def _batches(model: nn.Module, count: int = 3) -> list[dict[str, torch.Tensor]]:
    batches = [make_batch(model, seed=seed) for seed in range(count)]
    return [{**batch, "labels": batch["input_ids"]} for batch in batches]


def _backward(model: nn.Module) -> nn.Module:
    batch = _batches(model, 1)[0]
    model(**batch).loss.backward()
    return model


def _saved(model: nn.Module, folder: str) -> tuple[str, type]:
    """A ragged student saved padded, so that loading it back prunes the padding away."""
    save_standard(prune_model(model, _ragged_masks(model)), folder)
    return folder, type(model)


# public call -> what it needs prepared (outside the count): each must resolve the adapter exactly once
CALLS: dict[str, tuple[Callable, Callable]] = {
    "unit_counts": (lambda m, _: m, unit_counts),
    "full_masks": (lambda m, _: m, full_masks),
    "axes": (lambda m, _: m, axes),
    "layer_parameters": (lambda m, _: m, layer_parameters),
    "validate_masks": (lambda m, _: (m, _ragged_masks(m)), lambda a: validate_masks(*a)),
    "masked_parameter_slices": (
        lambda m, _: (m, _ragged_masks(m)),
        lambda a: masked_parameter_slices(*a),
    ),
    "zero_masked_": (lambda m, _: (m, _ragged_masks(m)), lambda a: zero_masked_(*a)),
    "apply_masks": (
        lambda m, _: (m, {k: v for k, v in _ragged_masks(m).items() if k != "layers"}),
        lambda a: apply_masks(*a).remove(),
    ),
    "prune_model": (lambda m, _: (m, _ragged_masks(m)), lambda a: prune_model(*a)),
    "prune_model_": (lambda m, _: (m, _ragged_masks(m)), lambda a: prune_model_(*a)),
    "pruned_parameter_count": (lambda m, _: (m, _ragged_masks(m)), lambda a: pruned_parameter_count(*a)),
    "student_shape": (lambda m, _: m, student_shape),
    "shape_masks": (lambda m, _: (m, student_shape(m)), lambda a: shape_masks(*a)),
    "rebuild_shape_": (
        lambda m, _: (m, _shrunk_shape(m)),
        lambda a: rebuild_shape_(*a),
    ),
    "widen_dropout_": (
        lambda m, _: (m, 32, torch.arange(0, 32, 2)),
        lambda a: widen_dropout_(*a),
    ),
    "plain_dropout_": (lambda m, _: m, plain_dropout_),
    "score_units-sensitivity": (lambda m, _: m, lambda m: score_units(m, _batches(m))),
    "score_units-platon": (lambda m, _: m, lambda m: score_units(m, _batches(m), method="platon")),
    "score_units-activation": (lambda m, _: m, lambda m: score_units(m, _batches(m), method="activation")),
    "score_units-random": (lambda m, _: m, lambda m: score_units(m, method="random")),
    "unit_sensitivity": (lambda m, _: _backward(m), unit_sensitivity),
    "Sensitivity.update": (lambda m, _: _backward(m), lambda m: Sensitivity().update(m)),
    "PlatonImportance.update": (lambda m, _: _backward(m), lambda m: PlatonImportance().update(m)),
    "extract-impt": (
        lambda m, _: m,
        lambda m: extract(
            m, num_layers=2, hidden_size=16, num_attention_heads=2, strategy="impt", data=_batches(m)
        ),
    ),
    "extract-rand": (lambda m, _: m, lambda m: extract(m, num_layers=2, intermediate_size=24)),
    "to_standard": (lambda m, _: prune_model(m, _ragged_masks(m)), to_standard),
    "save_standard": (
        lambda m, folder: (prune_model(m, _ragged_masks(m)), folder),
        lambda a: save_standard(*a),
    ),
    "load_pruned": (_saved, lambda a: load_pruned(*a)),
    "check_exportable": (lambda m, _: m, lambda m: check_exportable(m, 24, 3)),
    "keep_layers_": (lambda m, _: m, lambda m: keep_layers_(m, [0, 2])),
    "select_layers": (lambda m, _: m, lambda m: select_layers(m, [2])),
    "max_sequence_length": (lambda m, _: m, max_sequence_length),
    "model_info": (lambda m, _: m, lambda m: model_info(m, "student")),
    "masked_lm_parts": (lambda m, _: m, masked_lm_parts),
    "capture_qkv": (lambda m, _: m, lambda m: _capture(m)),
}


def _capture(model: nn.Module) -> None:
    with capture_qkv(model, [0, 2]) as store, torch.no_grad():
        model(**make_batch(model))
    assert sorted(store) == [0, 2]


@pytest.mark.parametrize("call", list(CALLS))
def test_one_public_call_resolves_the_adapter_once(
    arch: str, call: str, resolutions: list[str], tmp_path
) -> None:
    prepare, run = CALLS[call]
    argument = prepare(make_model(arch), str(tmp_path / "student"))
    resolutions.clear()
    run(argument)
    assert len(resolutions) == 1, f"{call} resolved the adapter {len(resolutions)} times: {resolutions}"


def test_a_bound_model_resolves_nothing_more(arch: str, resolutions: list[str]) -> None:
    model = make_model(arch)
    masks = _ragged_masks(model)
    shape = _shrunk_shape(model)
    resolutions.clear()
    bound = bind(model)
    assert resolutions == [type(model).__name__]
    assert bind(bound) is bound and unbind(bound) is model and unbind(model) is model
    prune_model(bound, masks)
    rebuild_shape_(bound, shape)
    score_units(bound, _batches(model))
    assert unit_counts(bound) == unit_counts(model)
    assert len(resolutions) == 2  # the one bind, and the unit_counts of the plain model


def test_the_bound_view_reads_the_live_model_after_surgery(arch: str) -> None:
    model = make_model(arch)
    masks = _ragged_masks(model)
    bound = bind(model)
    before = bound.unit_counts()
    layers_before = bound.layers()
    prune_model_(bound, masks)
    after = bound.unit_counts()
    assert after != before
    assert after == {
        "heads": [3, 2],
        "ffn": [48, 32],
        "hidden": 24,
        "layers": 2,
        "head_size": 8,
    }
    assert bound.layers() is not layers_before and len(bound.layers()) == 2
    assert bound.residual_width() == bound.hidden_size() == 24
    assert bound.config() is model.config


def test_public_calls_return_plain_models_when_given_bound_ones(arch: str) -> None:
    model = make_model(arch)
    bound = bind(model)
    student = prune_model(bound, _ragged_masks(model))
    assert not isinstance(student, BoundModel) and student is not model
    assert isinstance(select_layers(bound, [0]), nn.Module)
    assert keep_layers_(bound, [0, 2]) is model and unit_counts(model)["layers"] == 2
    assert isinstance(extract(bound, num_layers=1), nn.Module)


def test_bind_refuses_an_unknown_architecture_by_name() -> None:
    with pytest.raises(ValueError, match="no adapter for Linear.*Supported model types"):
        bind(nn.Linear(2, 2))
    assert try_bind(nn.Linear(2, 2)) is None
    assert try_bind(make_model("bert")).adapter is registry.get_adapter(make_model("bert"))
