"""RoBERTa: BERT's layout under other class names."""

from __future__ import annotations

from .bert import BertAdapter
from .registry import register_adapter


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
