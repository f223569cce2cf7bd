"""RoBERTa: BERT's layout under other class names."""

from __future__ import annotations

from torch import nn

from lightning_kd.models.bert import BertAdapter
from lightning_kd.models.registry import register_adapter


@register_adapter
class RobertaAdapter(BertAdapter):
    model_types = ("roberta", "xlm-roberta")
    head_modules = {
        "lm_head.dense": "rw",
        "lm_head.layer_norm": "n",
        "lm_head.decoder": "r",
        "classifier.dense": "rw",
        "classifier.out_proj": "r",
        "classifier": "r",
        "qa_outputs": "r",
    }
    masked_lm_heads = {"RobertaForMaskedLM": "lm_head", "XLMRobertaForMaskedLM": "lm_head"}

    def max_positions(self, model: nn.Module) -> int | None:
        # positions start after the padding index: 514 embeddings hold 512 tokens
        config = self.config(model)
        return config.max_position_embeddings - (config.pad_token_id or 0) - 1
