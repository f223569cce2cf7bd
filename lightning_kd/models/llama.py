"""Llama (3.x) and the decoder families that share its layout: Mistral, Qwen2/2.5 and Qwen3.

What is a unit here, and why:

- attention: a **key/value group** with the query heads that share it (grouped-query attention). The unit is
  the group rather than single query heads because (1) the config has one ratio of query to key/value heads,
  so removing whole groups always leaves a standard config, whereas removing query heads one by one would have
  to keep every group equally full; (2) a group's key and value heads are what the KV cache holds, the memory
  that bounds decoding, and only removing them shrinks it. The cost is coarseness where groups are few
  (Qwen2.5-0.5B and -1.5B have 2 per layer): prune FFN neurons and hidden channels there, as Minitron's width
  pruning of Llama-3.1-8B did, which kept every attention head;
- an FFN neuron: its row of ``gate_proj`` and of ``up_proj`` and its column of ``down_proj``, together;
- a hidden channel: a column of every map reading the residual stream (q/k/v, gate/up, the LM head), a row of
  every map writing it (o_proj, down_proj), an entry of every RMSNorm's weight, and a column of the token
  embeddings (tied to the LM head or not). Qwen3's q/k norms act on the head dimension and are left alone;
- head dimensions are not units (rotary embeddings); layers are (each keeps its sliding or full attention).

The config stores the head size (``head_dim``), so any hidden width holds any number of groups.
"""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from lightning_kd.models.adapter import ArchitectureAdapter, HiddenParts, LayerParts, MaskedLMParts
from lightning_kd.models.registry import register_adapter


@register_adapter
class LlamaAdapter(ArchitectureAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    free_head_size = True
    rotary = True
    causal_attention = True
    head_modules = {"lm_head": "r", "score": "r", "qa_outputs": "r"}
    masked_lm_heads = {}  # causal LMs: see masked_lm_parts

    def encoder(self, model: nn.Module) -> nn.Module:
        return self.base_model(model)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.base_model(model).layers

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        self.base_model(model).layers = layers

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def layer_parts(self, layer: nn.Module) -> LayerParts:
        attention, mlp = layer.self_attn, layer.mlp
        return LayerParts(
            query=attention.q_proj,
            key=attention.k_proj,
            value=attention.v_proj,
            attention_output=attention.o_proj,
            attention_norm=layer.input_layernorm,
            ffn_input=mlp.up_proj,
            ffn_gate=mlp.gate_proj,
            ffn_output=mlp.down_proj,
            ffn_norm=layer.post_attention_layernorm,
            query_heads_per_unit=attention.num_key_value_groups,
        )

    def hidden_parts(self, model: nn.Module) -> HiddenParts:
        base = self.base_model(model)
        parts = HiddenParts()
        parts.add(base.embed_tokens, "e")
        parts.add(base.norm, "n")
        for path, module in self.prediction_heads(model).items():
            parts.add(module, self.head_modules[path])
        return parts

    def masked_lm_parts(self, model: nn.Module) -> MaskedLMParts | None:
        # a causal LM's head reads the final hidden states row by row, so it too runs only where a loss reads
        if not type(model).__name__.endswith("ForCausalLM"):
            return None
        return MaskedLMParts(self.base_model(model), model.lm_head)

    def head_size(self, model: nn.Module) -> int:
        config = self.config(model)
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def set_attention_shape(self, layer: nn.Module, num_heads: int, head_size: int) -> None:
        # the forward infers the head count from the weights; groups and head size never change
        layer.self_attn.head_dim = head_size

    def update_config(
        self,
        config: PretrainedConfig,
        *,
        hidden: int,
        heads: int,
        head_size: int,
        intermediate: int,
        layers: int,
    ) -> None:
        groups = config.num_attention_heads // config.num_key_value_heads
        config.hidden_size = hidden
        config.num_attention_heads = heads
        config.num_key_value_heads = heads // groups
        config.head_dim = head_size  # stored, so a narrower stream keeps the teacher's head size
        config.intermediate_size = intermediate
        config.num_hidden_layers = layers

    def attention_dropout(self, layer: nn.Module) -> nn.Dropout | None:
        return None  # applied as a function, with the probability in self_attn.attention_dropout

    def disable_attention_dropout(self, layer: nn.Module) -> None:
        layer.self_attn.attention_dropout = 0.0
