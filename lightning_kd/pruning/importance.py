"""How much each structural unit matters: sensitivity, PLATON smoothing, activations, or chance.

A scorer is fed step by step (``update(model)`` right after ``backward()``, e.g. from a callback's
``on_before_optimizer_step``) or one-shot over a dataloader with ``score_units``. ``scores()`` returns a dict shaped
like a mask set (see ``units.py``) plus ``"head_dims"``; a higher score means more important. Scorers keep
their statistics as tensors in ``state_dict()`` so a checkpoint resumes them exactly. Under DDP the
gradients are already averaged, so gradient-based scores agree across ranks; activation statistics do not
and should be all-reduced (every tensor in ``state_dict()`` is a sum or a count). The sensitivity itself
(``|theta * grad|`` per unit) is computed in :mod:`.sensitivity`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_kd.checks import check_number
from lightning_kd.models.bound import BoundModel, bind
from lightning_kd.pruning.sensitivity import Scores, empty_scores, sensitivity_on_device
from lightning_kd.pruning.sensitivity import (
    unit_sensitivity as unit_sensitivity,
)  # importable here, as before

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def _usable(step: Scores, taken: torch.Tensor | None) -> torch.Tensor:
    """Whether this step's sensitivities may count (a device bool, no sync): all finite, and the optimizer takes
    the step (a GradScaler skips steps whose gradients overflowed; their scores would be inf or NaN for good)."""
    values = list(step.values())
    ok = torch.stack([torch.isfinite(v).all() for v in values]).all() if values else torch.tensor(True)
    return ok if taken is None else ok & taken.to(ok.device)


class UnitImportance:
    """Base of the scorers: tensors in ``self.state`` are the whole state, so checkpoints are trivial.

    ``update(model, taken)`` reads the gradients now in ``model``; ``taken`` (a bool tensor, default true) says
    whether the optimizer applies this step: statistics follow only steps that are taken and finite.
    """

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] = {}
        self._scratch: dict[Any, torch.Tensor] = {}  # the sensitivity's product buffer, kept between steps

    def __getstate__(self) -> dict[str, Any]:
        # a copy or a pickle (ddp_spawn sends the callback to its processes) need not carry the buffer
        return {**self.__dict__, "_scratch": {}}

    def update(self, model: nn.Module | BoundModel, taken: torch.Tensor | None = None) -> None:
        raise NotImplementedError

    def scores(self) -> Scores:
        raise NotImplementedError

    def reset(self) -> None:
        self.state = {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: value.detach().cpu().clone() for key, value in self.state.items()}

    def _stored(self, key: str, like: torch.Tensor) -> torch.Tensor:
        # where the model's gradients are (a restored checkpoint arrives on the CPU)
        value = self.state.get(key)
        return torch.zeros_like(like) if value is None else value.to(like.device)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = {key: torch.as_tensor(value).clone() for key, value in state.items()}

    def keep_units(self, masks: Mapping[str, torch.Tensor]) -> None:
        """The model lost units: keep the statistics of those that remain (``masks`` relative to its old shape).

        Heads and FFN rows are repacked to the front, as the shrunk model lays its units out.
        """
        for key, value in list(self.state.items()):
            kind = key.split(".")[0]
            # head_dims statistics ([layers, heads, head_size]) lose the rows of the heads that go
            follows = "heads" if kind == "head_dims" else kind
            if follows not in masks or follows not in ("heads", "ffn", "hidden"):
                continue
            mask = masks[follows].to(value.device)
            if kind == "hidden":
                self.state[key] = value[mask]
                continue
            kept = mask.sum(-1)
            packed = torch.arange(int(kept.max()), device=value.device)[None, :] < kept[:, None]
            out = torch.zeros(
                value.shape[0], packed.shape[1], *value.shape[2:], dtype=value.dtype, device=value.device
            )
            out[packed] = value[:, : mask.shape[1]][mask]
            self.state[key] = out

    def _ready(self) -> None:
        if not self.state:
            raise RuntimeError(f"{type(self).__name__} has no statistics yet: call update(model) first.")


class Sensitivity(UnitImportance):
    """``|theta * grad|`` per unit, summed over every ``update`` (of the unit ``kinds`` given, default all)."""

    def __init__(self, kinds: Iterable[str] | None = None) -> None:
        super().__init__()
        self.kinds = list(kinds) if kinds is not None else None

    def update(self, model: nn.Module | BoundModel, taken: torch.Tensor | None = None) -> None:
        step = sensitivity_on_device(model, self.kinds, self._scratch)
        ok = _usable(step, taken)
        for kind, value in step.items():
            self.state[kind] = self._stored(kind, value) + torch.where(ok, value, 0.0)

    def scores(self) -> Scores:
        self._ready()
        return {kind: value.cpu().clone() for kind, value in self.state.items()}


class PlatonImportance(UnitImportance):
    """PLATON (Zhang et al., 2022) per unit: EMA of the sensitivity times EMA of its uncertainty.

    ``I`` is the unit sensitivity averaged over a window of ``delta_t`` steps (PLATON's local window, 10 in its
    paper; 1 updates every step), ``mean = b1 * mean + (1 - b1) * I``,
    ``uncertainty = b2 * uncertainty + (1 - b2) * |I - mean|``, score ``mean * uncertainty``. Smoothing per
    unit rather than per weight keeps the state tiny (a few thousand numbers for BERT-base). Steps the
    optimizer skips, or whose sensitivities are not finite, do not count in a window.
    """

    def __init__(
        self, beta1: float = 0.85, beta2: float = 0.95, kinds: Iterable[str] | None = None, delta_t: int = 1
    ) -> None:
        super().__init__()
        self.kinds = list(kinds) if kinds is not None else None
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {beta}.")
        check_number("delta_t", delta_t, integer=True, low=1, what="a whole number of steps >= 1")
        self.beta1, self.beta2, self.delta_t = beta1, beta2, delta_t
        self._calls = 0  # updates so far; a plain int, so closing a window never reads a tensor

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), "window.calls": torch.tensor(self._calls)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        state = dict(state)
        self._calls = int(state.pop("window.calls", 0))
        super().load_state_dict(state)

    def update(self, model: nn.Module | BoundModel, taken: torch.Tensor | None = None) -> None:
        step = sensitivity_on_device(model, self.kinds, self._scratch)
        ok = _usable(step, taken)
        for kind, value in step.items():
            self.state[f"{kind}.window"] = self._stored(f"{kind}.window", value) + torch.where(ok, value, 0.0)
        counted = self._stored("window.steps", ok.float()) + ok.float()
        # the window's length is counted on the host, so deciding when it closes never waits for the device
        self._calls += 1
        self.state["window.steps"] = counted
        if self._calls % self.delta_t:
            return
        any_counted = counted > 0
        for kind in step:
            window = self.state[f"{kind}.window"]
            value = window / counted.clamp_min(1.0)
            mean = self._stored(f"{kind}.mean", value)
            uncertainty = self._stored(f"{kind}.uncertainty", value)
            new_mean = self.beta1 * mean + (1 - self.beta1) * value
            new_uncertainty = self.beta2 * uncertainty + (1 - self.beta2) * (value - new_mean).abs()
            # a window of skipped steps leaves the statistics as they were
            self.state[f"{kind}.mean"] = torch.where(any_counted, new_mean, mean)
            self.state[f"{kind}.uncertainty"] = torch.where(any_counted, new_uncertainty, uncertainty)
            self.state[f"{kind}.window"] = torch.zeros_like(window)
        self.state["window.steps"] = torch.zeros_like(counted)

    def scores(self) -> Scores:
        self._ready()
        kinds = {key.split(".")[0] for key in self.state if key.endswith(".mean")}
        if not kinds:
            raise RuntimeError(
                f"PlatonImportance has no statistics yet: its first window of {self.delta_t} steps "
                "has not closed."
            )
        return {
            kind: (self.state[f"{kind}.mean"] * self.state[f"{kind}.uncertainty"]).cpu() for kind in kinds
        }


class ActivationImportance(UnitImportance):
    """Mean absolute activation of each unit, read by forward hooks while the model runs.

    Heads: their attention outputs; FFN neurons: their activations; hidden dimensions: the layer outputs;
    layers: how much they change the residual stream. Call ``attach(model)`` before the forward passes (the
    constructor does it when given a model) and ``detach()`` after; ``update`` only counts steps.
    """

    def __init__(self, model: nn.Module | BoundModel | None = None) -> None:
        super().__init__()
        self._handles: list = []
        if model is not None:
            self.attach(model)

    def _add(self, kind: str, value: torch.Tensor, row: int | None = None) -> None:
        value = value.detach().float().cpu()
        total = self.state[kind]
        if row is None:
            total += value
        else:
            total[row, : value.shape[0]] += value

    def attach(self, model: nn.Module | BoundModel) -> None:
        bound = bind(model)
        counts = bound.unit_counts()
        if not self.state:
            self.state = empty_scores(bound)
            self.state["batches"] = torch.zeros(())
        head_size = counts["head_size"]
        unit_width = head_size * bound.queries_per_unit()

        def on_context(row: int):
            def hook(_module: nn.Module, args: tuple) -> None:
                grid = (
                    args[0]
                    .abs()
                    .reshape(-1, args[0].shape[-1] // unit_width, unit_width // head_size, head_size)
                )
                self._add("heads", grid.mean(dim=(0, 2, 3)), row)
                self._add("head_dims", grid.mean(dim=(0, 2)), row)

            return hook

        def on_neurons(row: int):
            def hook(_module: nn.Module, args: tuple) -> None:
                self._add("ffn", args[0].abs().reshape(-1, args[0].shape[-1]).mean(0), row)

            return hook

        def on_layer(row: int):
            def hook(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                before = args[0] if args else kwargs["hidden_states"]
                after = output[0] if isinstance(output, tuple) else output
                self._add("hidden", after.abs().reshape(-1, after.shape[-1]).mean(0) / counts["layers"])
                change = (after - before).norm(dim=-1).mean()
                self.state["layers"][row] += change.detach().float().cpu()

            return hook

        for i, layer in enumerate(bound.layers()):
            parts = bound.layer_parts(layer)
            self._handles += [
                parts.attention_output.register_forward_pre_hook(on_context(i)),
                parts.ffn_output.register_forward_pre_hook(on_neurons(i)),
                layer.register_forward_hook(on_layer(i), with_kwargs=True),
            ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def update(self, model: nn.Module | BoundModel | None = None) -> None:
        self._ready()
        self.state["batches"] += 1

    def scores(self) -> Scores:
        self._ready()
        batches = max(float(self.state["batches"]), 1.0)
        return {kind: value / batches for kind, value in self.state.items() if kind != "batches"}


class RandomImportance(UnitImportance):
    """Uniform random scores, reproducible from ``seed`` (the ``rand`` baseline of ETD)."""

    def __init__(self, model: nn.Module | BoundModel, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.state = {
            kind: torch.rand(value.shape, generator=generator) for kind, value in empty_scores(model).items()
        }

    def update(self, model: nn.Module | BoundModel | None = None) -> None:
        pass

    def scores(self) -> Scores:
        return {kind: value.clone() for kind, value in self.state.items()}


METHODS = ("sensitivity", "platon", "activation", "random")


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The model's own loss: ``model(**batch).loss`` (needs labels in the batch and a task head)."""
    output = model(**batch) if isinstance(batch, Mapping) else model(*batch)
    loss = getattr(output, "loss", None)
    if loss is None:
        raise ValueError(
            f"{type(model).__name__} returned no loss for this batch. Importance needs a loss: give batches "
            "with 'labels' to a model with a task head (e.g. *ForMaskedLM with MLM labels), or pass "
            "loss_fn=callable(model, batch) -> scalar tensor."
        )
    return loss


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


def score_units(
    model: nn.Module | BoundModel,
    data: Iterable[Any] | None = None,
    method: str = "sensitivity",
    loss_fn: LossFn | None = None,
    max_batches: int | None = None,
    seed: int = 0,
    **scorer_kwargs: Any,
) -> Scores:
    """One-shot importance of every unit of ``model`` over (up to ``max_batches`` of) ``data``.

    ``model`` is left as it was: its gradients, ``requires_grad`` flags and train/eval mode are restored.
    """
    if method not in METHODS:
        raise ValueError(f"unknown importance method {method!r}; choose one of {', '.join(METHODS)}.")
    bound = bind(model)
    model = bound.model  # forward, backward and the saved flags need the module itself
    if method == "random":
        return RandomImportance(bound, seed=seed).scores()
    if data is None:
        raise ValueError(f"importance method {method!r} needs data: pass an iterable of batches.")
    loss_fn = loss_fn or default_loss
    device = next(model.parameters()).device
    was_training = model.training
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    model.eval()  # dropout off: scores should reflect the weights, not the noise
    if method == "activation":
        scorer: UnitImportance = ActivationImportance(bound)
    else:
        scorer = PlatonImportance(**scorer_kwargs) if method == "platon" else Sensitivity()
        for parameter, _, _ in saved:
            parameter.requires_grad_(True)
    seen = 0
    try:
        for batch in data:
            if max_batches is not None and seen >= max_batches:
                break
            batch = _to_device(batch, device)
            if method == "activation":
                with torch.no_grad():
                    model(**batch) if isinstance(batch, Mapping) else model(*batch)
            else:
                model.zero_grad(set_to_none=True)
                loss_fn(model, batch).backward()
            scorer.update(bound)
            seen += 1
    finally:
        if isinstance(scorer, ActivationImportance):
            scorer.detach()
        for parameter, requires_grad, grad in saved:
            parameter.requires_grad_(requires_grad)
            parameter.grad = grad
        model.train(was_training)
    if seen == 0:
        raise ValueError("the data yielded no batches; importance needs at least one.")
    return scorer.scores()


def top_units(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """A bool mask over the last dimension of ``scores`` that keeps the ``keep`` highest per row.

    Ties are broken by position, so the result does not depend on the sort's stability.
    """
    if not 0 < keep <= scores.shape[-1]:
        raise ValueError(f"cannot keep {keep} of {scores.shape[-1]} units.")
    order = torch.argsort(scores.double(), dim=-1, descending=True, stable=True)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(-1, order[..., :keep], True)
