"""What every architecture adapter answers: where a transformer keeps its parts.

The rest of the library asks an adapter instead of reaching into ``model.encoder.layer[i]``, so adding an
architecture means writing one small subclass and registering it (see ``bert.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

Norm = nn.Module  # nn.LayerNorm (with or without bias), nn.RMSNorm or a family's own RMSNorm


@dataclass(frozen=True)
class LayerParts:
    """The linear maps and norms of one transformer block, named by role rather than by attribute.

    A role may be a slice of a fused map: when ``query``, ``key`` and ``value`` are one Linear (ModernBERT's
    ``Wqkv``), its output rows are three equal blocks, query first, each laid out as ``heads x head_size``. A
    gated FFN (``ffn_gated``) keeps both halves in ``ffn_input``: its rows are two equal blocks (the activated
    half, then the gate), and neuron ``j`` is row ``j`` of each, so the two rows are always removed together; a
    gated FFN with separate maps (Llama's ``gate_proj`` and ``up_proj``) names the gate ``ffn_gate``.
    ``attention_norm`` is None where a block has none (ModernBERT's first block reads the embedding norm).

    Grouped-query attention (``query_heads_per_unit`` > 1): the unit of attention is a key/value head with the
    query heads that share it, so ``query`` and ``attention_output`` hold that many heads per unit and ``key``
    and ``value`` one.
    """

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attention_output: nn.Linear
    attention_norm: Norm | None
    ffn_input: nn.Linear
    ffn_output: nn.Linear
    ffn_norm: Norm
    # DeBERTa's separate projections of the relative-position embeddings (absent when share_att_key)
    positional_query: nn.Linear | None = None
    positional_key: nn.Linear | None = None
    ffn_gated: bool = False
    ffn_gate: nn.Linear | None = None
    query_heads_per_unit: int = 1

    @property
    def head_projections(self) -> tuple[nn.Linear, ...]:
        """Every map whose outputs are laid out as ``heads x head_size`` (in blocks, see ``blocks``), once each."""
        maps = (self.query, self.key, self.value, self.positional_query, self.positional_key)
        unique: list[nn.Linear] = []
        for projection in maps:
            if projection is not None and all(projection is not seen for seen in unique):
                unique.append(projection)
        return tuple(unique)

    @property
    def query_projections(self) -> tuple[nn.Linear, ...]:
        """The maps on the query side of a score: scaling them changes the softmax temperature."""
        return tuple(p for p in (self.query, self.positional_query) if p is not None)

    @property
    def norms(self) -> tuple[Norm, ...]:
        return tuple(n for n in (self.attention_norm, self.ffn_norm) if n is not None)

    @property
    def ffn_inputs(self) -> tuple[nn.Linear, ...]:
        """The maps whose output rows are FFN neurons (the input map, and a separate gate map if any)."""
        return tuple(m for m in (self.ffn_input, self.ffn_gate) if m is not None)

    def rows_per_unit(self, linear: nn.Linear, head_size: int) -> int:
        """Output rows of a head projection (input columns of ``attention_output``) per unit of attention."""
        if linear is self.query or linear is self.attention_output:
            return head_size * self.query_heads_per_unit
        return head_size  # one key or value head per unit

    def blocks(self, linear: nn.Linear) -> int:
        """Into how many equal blocks, each laid out by the same units, ``linear``'s output rows fall."""
        if linear is self.ffn_input:
            return 2 if self.ffn_gated else 1
        return max(1, sum(linear is p for p in (self.query, self.key, self.value)))

    def query_scale(self, linear: nn.Linear, factor: float) -> Tensor | float:
        """What to multiply ``linear``'s output rows by to scale the queries (and only them) by ``factor``."""
        if linear not in self.query_projections:
            return 1.0
        blocks = self.blocks(linear)
        if blocks == 1:
            return factor
        scale = linear.weight.new_ones(linear.out_features)
        scale[: linear.out_features // blocks] = factor  # the query block comes first
        return scale

    def scale_queries_(self, factor: float) -> None:
        """Multiply the queries by ``factor`` in place (keys and values of a fused map untouched)."""
        with torch.no_grad():
            for projection in self.query_projections:
                scale = self.query_scale(projection, factor)
                column = scale[:, None] if isinstance(scale, Tensor) else scale
                projection.weight.mul_(column)
                if projection.bias is not None:
                    projection.bias.mul_(scale)

    def qkv_roles(self, linear: nn.Linear) -> list[str]:
        """Which of query, key and value ``linear`` computes (all three for a fused map, none for others)."""
        return [role for role in ("query", "key", "value") if getattr(self, role) is linear]

    def split_qkv(self, linear: nn.Linear, output: Tensor) -> dict[str, Tensor]:
        """The query, key and value that ``linear``'s ``output`` holds, by role."""
        roles = self.qkv_roles(linear)
        if len(roles) == 1:
            return {roles[0]: output}
        return dict(zip(roles, output.chunk(len(roles), dim=-1), strict=True))


@dataclass
class HiddenParts:
    """Everything outside the blocks that touches the hidden (residual) dimension, grouped by how.

    ``embeddings``: weight columns are hidden dims. ``readers``: Linear input features are hidden dims.
    ``writers``: Linear output features are hidden dims. ``norms``: LayerNorms over the hidden dims.
    ``convs``: Conv1d with hidden channels in and out. A Linear that is hidden x hidden (a pooler) is both a
    reader and a writer.
    """

    embeddings: list[nn.Embedding] = field(default_factory=list)
    readers: list[nn.Linear] = field(default_factory=list)
    writers: list[nn.Linear] = field(default_factory=list)
    norms: list[Norm] = field(default_factory=list)
    convs: list[nn.Conv1d] = field(default_factory=list)

    def add(self, module: nn.Module | None, roles: str) -> None:
        """Add ``module`` under each role letter in ``roles`` (e: embedding, r, w, n, c); skip None."""
        if module is None:
            return
        lists = {"e": self.embeddings, "r": self.readers, "w": self.writers, "n": self.norms, "c": self.convs}
        for role in roles:
            lists[role].append(module)


@dataclass(frozen=True)
class MaskedLMParts:
    """A masked-LM model split where its prediction head starts: ``model(**inputs).logits`` equals
    ``predict(encoder(**inputs).last_hidden_state)``, and ``predict`` works row by row, so it can be applied to
    only the positions a loss reads (its cost is vocabulary x hidden per row: a fifth of BERT-base's FLOPs when
    applied everywhere, far more for 50k-128k vocabularies)."""

    encoder: nn.Module  # the bare encoder, returning hidden states
    head: nn.Module  # the prediction head (what to compile beside the encoder)
    head_args: tuple[
        nn.Module, ...
    ] = ()  # extra modules the head's forward takes (DeBERTa's word embeddings)

    def predict(self, hidden: Tensor) -> Tensor:
        return self.head(hidden, *self.head_args)


def find_module(root: nn.Module, path: str) -> nn.Module | None:
    """``root.a.b.c`` for ``path="a.b.c"``, or None when any step is missing."""
    module: nn.Module | None = root
    for name in path.split("."):
        module = getattr(module, name, None)
        if not isinstance(module, nn.Module):
            return None
    return module


class ArchitectureAdapter:
    """Knows one family of Hugging Face encoders. Subclasses set ``model_types`` and the accessors."""

    model_types: tuple[str, ...] = ()
    # Whether the config stores the head size (DeBERTa) or derives it as hidden_size / num_attention_heads
    # (BERT). Exports of models whose head size does not match that ratio must pad when it is not free.
    free_head_size: bool = False
    # Rotary position embeddings turn each head's dimensions in pairs at fixed frequencies that the config
    # derives from the head size: a head can be removed whole, but its dimensions can be neither narrowed nor
    # padded without changing what the model computes.
    rotary: bool = False
    # Whether the first block has no attention norm because the embeddings end in one (ModernBERT): a block
    # that becomes first when the blocks before it are removed loses its attention norm, as the config builds it.
    first_block_without_attention_norm: bool = False
    # Whether attention is causal (decoders): a position sees only those before it, so what reads a whole
    # sequence from one position reads the last real token, not the first.
    causal_attention: bool = False
    # Modules outside the encoder (task heads, pooler) and how they touch the hidden dimension,
    # as {attribute path: role letters for HiddenParts.add}; missing paths are skipped.
    head_modules: dict[str, str] = {}

    def base_model(self, model: nn.Module) -> nn.Module:
        """The bare encoder (``BertModel`` inside ``BertForMaskedLM``, or the model itself)."""
        if isinstance(model, PreTrainedModel):
            return model.base_model
        return model

    def embeddings(self, model: nn.Module) -> nn.Module:
        return self.base_model(model).embeddings

    def encoder(self, model: nn.Module) -> nn.Module:
        return self.base_model(model).encoder

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.encoder(model).layer

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        """Put ``layers`` where the model keeps its blocks."""
        self.encoder(model).layer = layers

    def drop_attention_norm(self, layer: nn.Module) -> None:
        """Make ``layer`` a first block without an attention norm (see ``first_block_without_attention_norm``)."""
        raise NotImplementedError

    def layer_parts(self, layer: nn.Module) -> LayerParts:
        raise NotImplementedError

    def attention(self, layer: nn.Module) -> nn.Module:
        """The module that holds the per-layer head count and head size attributes."""
        return layer.attention.self

    def hidden_parts(self, model: nn.Module) -> HiddenParts:
        """Embeddings, norms and heads outside the blocks that carry the hidden dimension."""
        raise NotImplementedError

    def prediction_heads(self, model: nn.Module) -> dict[str, nn.Module]:
        """The task heads and pooler present on this model, by attribute path."""
        found = {path: find_module(model, path) for path in self.head_modules}
        return {path: module for path, module in found.items() if module is not None}

    # {class name of a masked-LM model: attribute path of its prediction head, called on the last hidden state}
    masked_lm_heads: dict[str, str] = {}

    def masked_lm_parts(self, model: nn.Module) -> MaskedLMParts | None:
        """The encoder and prediction head of a masked-LM model (None for any other model), so that callers can
        project to the vocabulary only where a loss reads."""
        path = self.masked_lm_heads.get(type(model).__name__)
        head = find_module(model, path) if path else None
        if head is None:
            return None
        return MaskedLMParts(self.base_model(model), head)

    def attention_mask_input(self, model: nn.Module, attention_mask: Tensor) -> Tensor:
        """The padding mask (batch, sequence) in the form to hand this model's forward."""
        return attention_mask

    def num_layers(self, model: nn.Module) -> int:
        return len(self.layers(model))

    @staticmethod
    def config(model: nn.Module) -> PretrainedConfig:
        return model.config

    def hidden_size(self, model: nn.Module) -> int:
        return self.config(model).hidden_size

    def residual_width(self, model: nn.Module) -> int:
        """The hidden size read from the weights, right even while the config is being rewritten."""
        return self.layer_parts(self.layers(model)[0]).attention_output.out_features

    def num_heads(self, model: nn.Module, layer: int | None = None) -> int:
        """Heads in a layer. Pruned models may differ per layer, so the attention output's width decides."""
        if layer is None:
            return self.config(model).num_attention_heads
        output = self.layer_parts(self.layers(model)[layer]).attention_output
        return output.in_features // self.head_size(model)

    def queries_per_unit(self, model: nn.Module) -> int:
        """Query heads per unit of attention: the query heads sharing a key/value head (1 without GQA)."""
        return self.layer_parts(self.layers(model)[0]).query_heads_per_unit

    def attention_units(self, model: nn.Module, layer: int) -> int:
        """Units of attention in a layer: heads, or key/value groups under grouped-query attention."""
        return self.num_heads(model, layer) // self.queries_per_unit(model)

    def intermediate_size(self, model: nn.Module, layer: int) -> int:
        # the FFN output reads one column per neuron, also where a gated input map holds two rows per neuron
        return self.layer_parts(self.layers(model)[layer]).ffn_output.in_features

    def head_size(self, model: nn.Module) -> int:
        config = self.config(model)
        return (
            getattr(config, "attention_head_size", None) or config.hidden_size // config.num_attention_heads
        )

    def set_attention_shape(self, layer: nn.Module, num_heads: int, head_size: int) -> None:
        """Tell a block's attention module its new head count and head size after surgery."""
        attention = self.attention(layer)
        attention.num_attention_heads = num_heads
        attention.attention_head_size = head_size
        attention.all_head_size = num_heads * head_size
        if hasattr(attention, "scaling"):
            attention.scaling = head_size**-0.5

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
        """Write the new sizes into ``config`` (in place). Only the head size needs per-family care."""
        old_hidden = config.hidden_size
        config.hidden_size = hidden
        config.num_attention_heads = heads
        config.intermediate_size = intermediate
        config.num_hidden_layers = layers
        if hidden == heads * head_size:
            if hasattr(config, "attention_head_size"):
                del config.attention_head_size
        else:
            # BERT ignores this (export.py pads such models); DeBERTa builds its attention from it
            config.attention_head_size = head_size
        if getattr(config, "pooler_hidden_size", None) == old_hidden:
            config.pooler_hidden_size = hidden
        if getattr(config, "embedding_size", None) == old_hidden:
            config.embedding_size = hidden

    def max_positions(self, model: nn.Module) -> int | None:
        """The longest input the position embeddings cover (None: no absolute limit)."""
        return getattr(self.config(model), "max_position_embeddings", None)

    def supports_attention_maps(self, model: nn.Module) -> bool:
        """Whether ``output_attentions=True`` returns probabilities (eager attention does; sdpa does not)."""
        return getattr(self.config(model), "_attn_implementation", "eager") == "eager"

    def attention_dropout(self, layer: nn.Module) -> nn.Dropout | None:
        """The dropout module applied to a block's attention probabilities (None: applied as a function)."""
        return layer.attention.self.dropout

    def disable_attention_dropout(self, layer: nn.Module) -> None:
        """Stop dropping attention probabilities in ``layer``."""
        self.attention_dropout(layer).p = 0.0

    def enable_attention_maps(self, model: nn.Module) -> None:
        """Make the forward pass return attention probabilities that can be distilled.

        Eager attention is the implementation that returns them, and it returns them *after* dropout: a KL
        against maps with dropped (zero) entries diverges, so attention-probability dropout is switched off.
        """
        for layer in self.layers(model):
            self.disable_attention_dropout(layer)
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


def query_rescale(old_head_size: int, new_head_size: int) -> float:
    """Factor for query weights that keeps ``q.k / sqrt(head_size)`` unchanged when the head size changes."""
    return math.sqrt(new_head_size / old_head_size)
