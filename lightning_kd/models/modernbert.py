"""ModernBERT: a fused query/key/value map, a gated (GeGLU) FFN, bias-free norms, rotary heads and alternating
local (sliding-window) and global attention.

What is a unit here, and what is not:

- a head is its rows in each third of ``Wqkv`` (query, key, value) and its columns of ``Wo``;
- an FFN neuron is two rows of ``Wi`` (its activated half and its gate) and a column of ``mlp.Wo``;
- a hidden dimension is a column of every map that reads the residual stream, a row of every map that writes
  it, an entry of every norm's weight, and a column of the (tied) word embeddings and MLM decoder;
- head dimensions are not units: rotary embeddings turn them in pairs at frequencies the config derives from
  the head size, so a narrower head would change what every kept head computes;
- the first block has no attention norm (it reads the embedding norm's output), so a depth choice without layer
  0 makes its new first block drop its own; each kept block keeps its attention kind, written in the config.

The config derives the head size as ``hidden_size / num_attention_heads`` and ``Wo`` is square, so a student
keeps its hidden size a multiple of the head size (64 for ModernBERT-base and -large).
"""

from __future__ import annotations

from torch import nn

from lightning_kd.models.adapter import ArchitectureAdapter, HiddenParts, LayerParts, MaskedLMParts
from lightning_kd.models.registry import register_adapter


@register_adapter
class ModernBertAdapter(ArchitectureAdapter):
    model_types = ("modernbert",)
    rotary = True
    first_block_without_attention_norm = True
    head_modules = {
        "head.dense": "rw",
        "head.norm": "n",
        "decoder": "r",
        "classifier": "r",
    }

    def encoder(self, model: nn.Module) -> nn.Module:
        return self.base_model(model)  # the blocks sit on the model itself, not in an encoder

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.base_model(model).layers

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        self.base_model(model).layers = layers

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.attn

    def layer_parts(self, layer: nn.Module) -> LayerParts:
        attention, mlp = layer.attn, layer.mlp
        norm = layer.attn_norm
        return LayerParts(
            query=attention.Wqkv,
            key=attention.Wqkv,
            value=attention.Wqkv,
            attention_output=attention.Wo,
            attention_norm=None if isinstance(norm, nn.Identity) else norm,
            ffn_input=mlp.Wi,
            ffn_output=mlp.Wo,
            ffn_norm=layer.mlp_norm,
            ffn_gated=True,
        )

    def drop_attention_norm(self, layer: nn.Module) -> None:
        layer.attn_norm = nn.Identity()

    def hidden_parts(self, model: nn.Module) -> HiddenParts:
        base = self.base_model(model)
        parts = HiddenParts()
        parts.add(base.embeddings.tok_embeddings, "e")
        parts.add(base.embeddings.norm, "n")
        parts.add(base.final_norm, "n")
        for path, module in self.prediction_heads(model).items():
            parts.add(module, self.head_modules[path])
        return parts

    def masked_lm_parts(self, model: nn.Module) -> MaskedLMParts | None:
        if type(model).__name__ != "ModernBertForMaskedLM":
            return None
        return MaskedLMParts(self.base_model(model), nn.Sequential(model.head, model.decoder))

    def set_attention_shape(self, layer: nn.Module, num_heads: int, head_size: int) -> None:
        # the forward reads only the head size (its view infers the head count from the weights)
        layer.attn.head_dim = head_size

    def attention_dropout(self, layer: nn.Module) -> nn.Dropout | None:
        return None  # applied as a function, with the probability in attn.attention_dropout

    def disable_attention_dropout(self, layer: nn.Module) -> None:
        layer.attn.attention_dropout = 0.0
