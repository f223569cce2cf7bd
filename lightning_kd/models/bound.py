"""A model bound to its architecture adapter once, so a chain of helpers does not resolve it again and again.

``bind(model)`` looks the adapter up (``get_adapter``) and returns a ``BoundModel``; ``bind(bound)`` returns
``bound`` itself, so every helper can call ``bind`` on what it is given and pass the result along, and one
public call resolves the adapter once. The view holds the model and its adapter and nothing else: pruning
replaces modules and parameters in place, so every layout answer (layers, parts, unit counts) is read from the
live model when asked, never remembered.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig

from lightning_kd.models.adapter import ArchitectureAdapter, HiddenParts, LayerParts, MaskedLMParts
from lightning_kd.models.registry import get_adapter


@dataclass(frozen=True)
class BoundModel:
    """``model`` with the ``adapter`` of its architecture: the adapter's layout questions, asked of ``model``."""

    model: nn.Module
    adapter: ArchitectureAdapter

    def on(self, model: nn.Module) -> BoundModel:
        """The same adapter bound to ``model``, another model of this architecture (a copy of this one)."""
        return BoundModel(model, self.adapter)

    def config(self) -> PretrainedConfig:
        return self.adapter.config(self.model)

    def encoder(self) -> nn.Module:
        return self.adapter.encoder(self.model)

    def layers(self) -> nn.ModuleList:
        return self.adapter.layers(self.model)

    def layer_parts(self, layer: nn.Module) -> LayerParts:
        return self.adapter.layer_parts(layer)

    def hidden_parts(self) -> HiddenParts:
        return self.adapter.hidden_parts(self.model)

    def masked_lm_parts(self) -> MaskedLMParts | None:
        return self.adapter.masked_lm_parts(self.model)

    def num_layers(self) -> int:
        return self.adapter.num_layers(self.model)

    def num_heads(self, layer: int | None = None) -> int:
        return self.adapter.num_heads(self.model, layer)

    def queries_per_unit(self) -> int:
        return self.adapter.queries_per_unit(self.model)

    def intermediate_size(self, layer: int) -> int:
        return self.adapter.intermediate_size(self.model, layer)

    def hidden_size(self) -> int:
        return self.adapter.hidden_size(self.model)

    def head_size(self) -> int:
        return self.adapter.head_size(self.model)

    def residual_width(self) -> int:
        return self.adapter.residual_width(self.model)

    def max_positions(self) -> int | None:
        return self.adapter.max_positions(self.model)

    def unit_counts(self) -> dict[str, list[int] | int]:
        """Units of attention (heads; key/value groups under GQA) and FFN neurons per layer, hidden size, layers
        and head size, as the live model has them now."""
        layers = range(self.num_layers())
        return {
            "heads": [self.adapter.attention_units(self.model, i) for i in layers],
            "ffn": [self.intermediate_size(i) for i in layers],
            "hidden": self.hidden_size(),
            "layers": self.num_layers(),
            "head_size": self.head_size(),
        }


def bind(model: nn.Module | BoundModel) -> BoundModel:
    """``model`` bound to its adapter (one ``get_adapter`` call); a ``BoundModel`` is returned unchanged.

    An architecture without an adapter raises ``get_adapter``'s error, which lists the supported ones.
    """
    if isinstance(model, BoundModel):
        return model
    return BoundModel(model, get_adapter(model))


def try_bind(model: nn.Module | BoundModel) -> BoundModel | None:
    """``bind(model)``, or None when lightning-kd has no adapter for its architecture."""
    try:
        return bind(model)
    except ValueError:
        return None


def unbind(model: nn.Module | BoundModel) -> nn.Module:
    """The plain model behind ``model``, bound or not (for what runs or saves it rather than asking its layout)."""
    return model.model if isinstance(model, BoundModel) else model
