"""What the objective and the module need to know of a model before training: its sizes, what it can return,
and where a masked LM's encoder ends and its prediction head begins."""

from __future__ import annotations

from torch import nn

from lightning_kd.models.adapter import MaskedLMParts
from lightning_kd.models.bound import BoundModel, try_bind, unbind
from lightning_kd.models.layers import is_classifier, is_question_answering
from lightning_kd.objective.term import ModelInfo


def has_adapter(model: nn.Module | BoundModel) -> bool:
    """Whether lightning-kd knows ``model``'s architecture (pruning, q/k/v capture, gathered heads)."""
    return try_bind(model) is not None


def masked_lm_parts(model: nn.Module | BoundModel) -> MaskedLMParts | None:
    """The encoder and prediction head of a masked LM of a known architecture, else None."""
    bound = try_bind(model)
    return bound.masked_lm_parts() if bound is not None else None


def model_info(model: nn.Module | BoundModel, name: str) -> ModelInfo:
    bound = try_bind(model)
    model = unbind(model)
    config = model.config
    known = bound is not None
    if known:
        layers, heads = bound.num_layers(), bound.num_heads()
    else:
        layers, heads = config.num_hidden_layers, config.num_attention_heads
    eager = getattr(config, "_attn_implementation", "eager") == "eager"
    return ModelInfo(
        num_layers=layers,
        hidden_size=config.hidden_size,
        num_heads=heads,
        vocab_size=config.vocab_size,
        # an MLM head (output embeddings), a classifier or a QA head: each returns logits
        predicts=(hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None)
        or is_classifier(model)
        or is_question_answering(model),
        num_outputs=_num_outputs(model),  # read only when predicts
        causal=type(model).__name__.endswith("ForCausalLM"),
        can_return_attentions=eager or known,
        can_return_qkv=known,
        name=name,
        reads_last_token=known and bound.adapter.causal_attention,
        qkv_widths=_qkv_widths(bound) if known else (),
    )


def _qkv_widths(bound: BoundModel) -> tuple[dict[str, int], ...]:
    """Every block's query, key and value widths, read from the maps (a fused map holds one block per role)."""
    widths = []
    for layer in bound.layers():
        parts = bound.layer_parts(layer)
        roles = {"query": parts.query, "key": parts.key, "value": parts.value}
        widths.append({role: linear.out_features // parts.blocks(linear) for role, linear in roles.items()})
    return tuple(widths)


def _num_outputs(model: nn.Module) -> int:
    """Logits per row: a classifier's labels, a QA head's two (start and end), else the vocabulary."""
    if is_classifier(model):
        return model.config.num_labels
    if is_question_answering(model):
        return 2
    return model.config.vocab_size
