"""What every architecture adapter answers: where a transformer keeps its parts.

The rest of the library asks an adapter instead of reaching into ``model.encoder.layer[i]``, so adding an
architecture means writing one small subclass and registering it (see ``bert.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class LayerParts:
    """The linear maps and norms of one transformer block, named by role rather than by attribute."""

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attention_output: nn.Linear
    attention_norm: nn.LayerNorm
    ffn_input: nn.Linear
    ffn_output: nn.Linear
    ffn_norm: nn.LayerNorm


class ArchitectureAdapter:
    """Knows one family of Hugging Face encoders. Subclasses set ``model_types`` and the accessors."""

    model_types: tuple[str, ...] = ()

    def base_model(self, model: nn.Module) -> nn.Module:
        """The bare encoder (``BertModel`` inside ``BertForMaskedLM``, or the model itself)."""
        if isinstance(model, PreTrainedModel):
            return model.base_model
        return model

    def embeddings(self, model: nn.Module) -> nn.Module:
        return self.base_model(model).embeddings

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.base_model(model).encoder.layer

    def layer_parts(self, layer: nn.Module) -> LayerParts:
        raise NotImplementedError

    def num_layers(self, model: nn.Module) -> int:
        return len(self.layers(model))

    @staticmethod
    def config(model: nn.Module) -> PretrainedConfig:
        return model.config

    def hidden_size(self, model: nn.Module) -> int:
        return self.config(model).hidden_size

    def num_heads(self, model: nn.Module, layer: int | None = None) -> int:
        """Heads in a layer. Pruned models may differ per layer, so the query width decides."""
        if layer is None:
            return self.config(model).num_attention_heads
        query = self.layer_parts(self.layers(model)[layer]).query
        return query.out_features // self.head_size(model)

    def head_size(self, model: nn.Module) -> int:
        config = self.config(model)
        return (
            getattr(config, "attention_head_size", None) or config.hidden_size // config.num_attention_heads
        )

    def supports_attention_maps(self, model: nn.Module) -> bool:
        """Whether ``output_attentions=True`` returns probabilities (eager attention does; sdpa does not)."""
        return getattr(self.config(model), "_attn_implementation", "eager") == "eager"

    def enable_attention_maps(self, model: nn.Module) -> None:
        """Switch to eager attention so that attention probabilities come back from the forward pass."""
        if self.supports_attention_maps(model):
            return
        setter = getattr(model, "set_attn_implementation", None)
        if setter is None:
            raise ValueError(
                f"{type(model).__name__} cannot return attention maps with attention implementation "
                f"{self.config(model)._attn_implementation!r}. Load it with attn_implementation='eager', "
                "or use the 'relations' term, which reads queries, keys and values instead."
            )
        setter("eager")
