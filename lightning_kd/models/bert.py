"""BERT: the reference layout that RoBERTa shares."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_kd.models.adapter import ArchitectureAdapter, HiddenParts, LayerParts
from lightning_kd.models.registry import register_adapter


@register_adapter
class BertAdapter(ArchitectureAdapter):
    model_types = ("bert",)
    head_modules = {
        "cls.predictions.transform.dense": "rw",
        "cls.predictions.transform.LayerNorm": "n",
        "cls.predictions.decoder": "r",
        "cls.seq_relationship": "r",
        "classifier": "r",
        "qa_outputs": "r",
    }
    masked_lm_heads = {"BertForMaskedLM": "cls"}

    def attention_mask_input(self, model: nn.Module, attention_mask: Tensor) -> Tensor:
        # Given a (batch, sequence) mask, Hugging Face's SDPA path asks the host whether it is all ones (to drop
        # it), which waits for a GPU at every forward pass. The (batch, 1, 1, sequence) boolean mask it would
        # otherwise build is taken as it is.
        if getattr(self.config(model), "_attn_implementation", None) == "sdpa" and attention_mask.dim() == 2:
            return attention_mask[:, None, None, :].bool()
        return attention_mask

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

    def hidden_parts(self, model: nn.Module) -> HiddenParts:
        base = self.base_model(model)
        embeddings = base.embeddings
        parts = HiddenParts()
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
            parts.add(getattr(embeddings, name, None), "e")
        parts.add(embeddings.LayerNorm, "n")
        pooler = getattr(base, "pooler", None)
        if pooler is not None:
            parts.add(pooler.dense, "rw")
        for path, module in self.prediction_heads(model).items():
            # "classifier" is a Linear on BERT but a small module on RoBERTa; only Linears read hidden here
            if isinstance(module, (nn.Linear, nn.LayerNorm)):
                parts.add(module, self.head_modules[path])
        return parts
