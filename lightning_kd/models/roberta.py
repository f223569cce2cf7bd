"""RoBERTa: BERT's layout under other class names."""

from __future__ import annotations

from .bert import BertAdapter
from .registry import register_adapter


@register_adapter
class RobertaAdapter(BertAdapter):
    model_types = ("roberta", "xlm-roberta")
