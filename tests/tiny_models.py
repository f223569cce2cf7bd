"""Every tiny model the tests build, from configs (nothing is downloaded): one place, so a new architecture is
added once.

- ``tiny_bert_config``: the 4-layer, 16-wide BERT of the module, objective and training tests;
- ``make_model``: BERT, RoBERTa and DeBERTa-v2 masked LMs, classifiers or question-answering models for the
  surgery tests (larger weights, so removing a unit visibly changes the outputs);
- ``tiny_classifier``: the three architectures' classifiers of the TED tests.
"""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForMaskedLM,
    DebertaV2ForQuestionAnswering,
    DebertaV2ForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    MistralForQuestionAnswering,
    MistralForSequenceClassification,
    ModernBertConfig,
    ModernBertForMaskedLM,
    ModernBertForQuestionAnswering,
    ModernBertForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForQuestionAnswering,
    Qwen2ForSequenceClassification,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3ForQuestionAnswering,
    Qwen3ForSequenceClassification,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
)

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    # larger weights than the default 0.02, so that removing a unit visibly changes the outputs
    initializer_range=0.2,
)

DECODER = {
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 8,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

ARCHITECTURES = {
    "bert": (BertConfig, BertForMaskedLM, BertForSequenceClassification, {}),
    "roberta": (RobertaConfig, RobertaForMaskedLM, RobertaForSequenceClassification, {"pad_token_id": 1}),
    # DeBERTa-v3's settings: relative attention, shared keys, both disentangled terms, normalised positions
    "deberta-v2": (
        DebertaV2Config,
        DebertaV2ForMaskedLM,
        DebertaV2ForSequenceClassification,
        {
            "relative_attention": True,
            "position_buckets": 8,
            "max_relative_positions": 16,
            "pos_att_type": ["p2c", "c2p"],
            "share_att_key": True,
            "norm_rel_ebd": "layer_norm",
            "position_biased_input": False,
            "type_vocab_size": 0,
        },
    ),
    # ModernBERT: fused Wqkv, gated FFN, rotary heads, bias-free norms; global attention in layers 0 and 2 and
    # a sliding window of 2 tokens each side in layer 1, so both attention kinds matter at length 10. Attention
    # biases on (ModernBERT-base has none) so that slicing a fused map's bias is tested too.
    "modernbert": (
        ModernBertConfig,
        ModernBertForMaskedLM,
        ModernBertForSequenceClassification,
        {
            "global_attn_every_n_layers": 2,
            "local_attention": 4,
            "attention_bias": True,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "cls_token_id": 1,
            "sep_token_id": 2,
        },
    ),
    # Decoders ("mlm" builds the causal LM): grouped-query attention with 4 key/value groups of 2 query heads
    # of 8 dimensions (wider than hidden / heads: the config stores the head size), a gated FFN, RMSNorms.
    # Llama unties its LM head, Qwen2 ties it and has q/k/v biases, Qwen3 adds per-head q/k norms, Mistral
    # a sliding window of 4 tokens.
    "llama": (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, DECODER),
    "qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2ForSequenceClassification,
        {**DECODER, "tie_word_embeddings": True},
    ),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, Qwen3ForSequenceClassification, DECODER),
    "mistral": (
        MistralConfig,
        MistralForCausalLM,
        MistralForSequenceClassification,
        {**DECODER, "sliding_window": 4},
    ),
}


# The decoder families that share Llama's layout and differ only in details (Qwen2's tied head and q/k/v biases,
# Mistral's sliding window) run the surgery tests that those details touch (tests/models/test_decoder_variants.py)
# rather than every one: the whole grid runs on Llama and Qwen3, and the suite keeps to its time.
LAYOUT_VARIANTS = ("qwen2", "mistral")
FAMILIES = tuple(name for name in ARCHITECTURES if name not in LAYOUT_VARIANTS)

QA_CLASSES = {
    "bert": BertForQuestionAnswering,
    "roberta": RobertaForQuestionAnswering,
    "deberta-v2": DebertaV2ForQuestionAnswering,
    "modernbert": ModernBertForQuestionAnswering,
    "llama": LlamaForQuestionAnswering,
    "qwen2": Qwen2ForQuestionAnswering,
    "qwen3": Qwen3ForQuestionAnswering,
    "mistral": MistralForQuestionAnswering,
}


def make_model(arch: str, head: str = "mlm", seed: int = 0, **overrides) -> torch.nn.Module:
    """``head``: ``mlm``, ``cls`` (a 3-label classifier) or ``qa`` (start and end logits)."""
    config_cls, mlm_cls, cls_cls, extra = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **extra, **overrides}, num_labels=3)
    model_cls = {"mlm": mlm_cls, "cls": cls_cls, "qa": QA_CLASSES[arch]}[head]
    if head == "qa":
        config.num_labels = 2
    model = model_cls(config)
    with torch.no_grad():
        # random LayerNorm affines and biases, so that slicing mistakes in them show up in the outputs
        for name, parameter in model.named_parameters():
            if "LayerNorm" in name or "norm" in name.lower() or name.endswith("bias"):
                parameter.normal_(0.0, 0.5).add_(1.0 if name.endswith("weight") else 0.0)
    return model.eval()


def make_batch(model: torch.nn.Module, batch: int = 2, length: int = 10, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[0, -3:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


VOCAB = 64


def tiny_bert_config(**overrides: object) -> BertConfig:
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=32,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    settings.update(overrides)
    return BertConfig(**settings)


CLASSIFIER_ARCHITECTURES = ("bert", "roberta", "deberta-v2")


def tiny_classifier(
    arch: str = "bert", layers: int = 4, hidden: int = 16, num_labels: int = 3, seed: int = 0
) -> torch.nn.Module:
    common = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    if arch == "bert":
        return BertForSequenceClassification(BertConfig(**common)).eval()
    if arch == "roberta":
        return RobertaForSequenceClassification(RobertaConfig(**common, pad_token_id=1)).eval()
    config = DebertaV2Config(
        **common,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        pooler_hidden_size=hidden,
        pooler_dropout=0.0,
        type_vocab_size=0,
    )
    return DebertaV2ForSequenceClassification(config).eval()


def output_logits(output: object) -> torch.Tensor:
    """A model output's logits; a QA model's start and end logits stacked, ``[B, 2, T]``."""
    if getattr(output, "start_logits", None) is not None:
        return torch.stack([output.start_logits, output.end_logits], dim=1)
    return output.logits
