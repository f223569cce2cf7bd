"""DeBERTa-v2 and v3 (disentangled attention; v3 uses the same modules)."""

from __future__ import annotations

from torch import nn

from .base import ArchitectureAdapter, LayerParts
from .registry import register_adapter


@register_adapter
class DebertaV2Adapter(ArchitectureAdapter):
    model_types = ("deberta-v2",)

    def layer_parts(self, layer: nn.Module) -> LayerParts:
        attention = layer.attention
        return LayerParts(
            query=attention.self.query_proj,
            key=attention.self.key_proj,
            value=attention.self.value_proj,
            attention_output=attention.output.dense,
            attention_norm=attention.output.LayerNorm,
            ffn_input=layer.intermediate.dense,
            ffn_output=layer.output.dense,
            ffn_norm=layer.output.LayerNorm,
        )
