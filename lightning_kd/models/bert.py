"""BERT: the reference layout that RoBERTa shares."""

from __future__ import annotations

from torch import nn

from .base import ArchitectureAdapter, LayerParts
from .registry import register_adapter


@register_adapter
class BertAdapter(ArchitectureAdapter):
    model_types = ("bert",)

    def layer_parts(self, layer: nn.Module) -> LayerParts:
        attention = layer.attention
        return LayerParts(
            query=attention.self.query,
            key=attention.self.key,
            value=attention.self.value,
            attention_output=attention.output.dense,
            attention_norm=attention.output.LayerNorm,
            ffn_input=layer.intermediate.dense,
            ffn_output=layer.output.dense,
            ffn_norm=layer.output.LayerNorm,
        )
