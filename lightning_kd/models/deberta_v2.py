"""DeBERTa-v2 and v3 (disentangled attention; v3 uses the same modules)."""

from __future__ import annotations

from torch import nn

from lightning_kd.models.adapter import ArchitectureAdapter, HiddenParts, LayerParts, MaskedLMParts
from lightning_kd.models.registry import register_adapter


@register_adapter
class DebertaV2Adapter(ArchitectureAdapter):
    model_types = ("deberta-v2",)
    free_head_size = True
    head_modules = {
        "pooler.dense": "rw",
        "classifier": "r",
        "qa_outputs": "r",
        "lm_predictions.lm_head.dense": "rw",
        "lm_predictions.lm_head.LayerNorm": "n",
        # the legacy MLM head maps hidden -> embedding_size; it is hidden-tied only without embed_proj
        "cls.predictions.transform.dense": "r",
    }

    def masked_lm_parts(self, model: nn.Module) -> MaskedLMParts | None:
        if type(model).__name__ != "DebertaV2ForMaskedLM":
            return None
        base = self.base_model(model)
        legacy = find_legacy_head(model)
        if legacy is not None:
            return MaskedLMParts(base, model.cls)
        # the current head decodes with the tied word embeddings, passed to its forward
        return MaskedLMParts(base, model.lm_predictions, (base.embeddings.word_embeddings,))

    def max_positions(self, model: nn.Module) -> int | None:
        # relative positions only (v3's default): any length runs
        config = self.config(model)
        return config.max_position_embeddings if getattr(config, "position_biased_input", True) else None

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
            positional_query=getattr(attention.self, "pos_query_proj", None),
            positional_key=getattr(attention.self, "pos_key_proj", None),
        )

    def hidden_parts(self, model: nn.Module) -> HiddenParts:
        base = self.base_model(model)
        embeddings, encoder = base.embeddings, base.encoder
        parts = HiddenParts()
        tied_embeddings = embeddings.embed_proj is None
        if tied_embeddings:
            for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
                parts.add(getattr(embeddings, name, None), "e")
        else:
            # word vectors keep embedding_size; only the projection into the residual stream is hidden-tied
            parts.add(embeddings.embed_proj, "w")
        parts.add(embeddings.LayerNorm, "n")
        parts.add(getattr(encoder, "rel_embeddings", None), "e")
        if "layer_norm" in encoder.norm_rel_ebd:
            parts.add(encoder.LayerNorm, "n")
        if encoder.conv is not None:
            parts.add(encoder.conv.conv, "c")
            parts.add(encoder.conv.LayerNorm, "n")
        for path, module in self.prediction_heads(model).items():
            parts.add(module, self.head_modules[path])
        legacy = find_legacy_head(model)
        if legacy is not None and tied_embeddings:
            parts.add(legacy.transform.dense, "w")
            parts.add(legacy.transform.LayerNorm, "n")
            parts.add(legacy.decoder, "r")
        return parts


def find_legacy_head(model: nn.Module) -> nn.Module | None:
    cls = getattr(model, "cls", None)
    return getattr(cls, "predictions", None) if cls is not None else None
