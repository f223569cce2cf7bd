"""The unified distillation objective ("Knowledge distillation: a unified view", Lu et al., 2022).

A recipe is a list of knowledge terms, each one a kind of knowledge (predictions, hidden states, attention
maps, q/k/v relations, embeddings, the task itself), a layer map saying which student layer learns from
which teacher layer, a loss and a weight. Every recipe in the KD-revisited grid is such a list, so it can be
written in YAML:

    objective:
      - {term: logits, temperature: 2.0, weight: 1.0}
      - {term: hidden, loss: mse, layers: uniform, weight: 1.0}
      - {term: relations, layers: last_layer, relations: [qq, kk, vv], weight: 1.0}

Layer numbers follow Hugging Face ``hidden_states``: 0 is the embedding output, ``i`` the output of block
``i``. Attention and relation terms read block ``i`` itself, so they take 1..L.

Padding never contributes: every term averages over positions whose ``attention_mask`` is 1 (and over the
masked positions of MLM when it reads predictions). Models with a known masked-LM head predict only at those
positions (``Features.positions``), and the terms read the rows they were given.
"""

from lightning_kd.batch import IGNORE_INDEX, PREDICTION_POSITIONS, prediction_positions
from lightning_kd.objective.generative import (
    TOKEN_LOSSES,
    NextTokenDistillation,
    chunked_cross_entropy,
    chunked_token_loss,
    token_divergence,
)
from lightning_kd.objective.objective import DistillationObjective, build_term
from lightning_kd.objective.predictions import prediction_kl, prediction_mse
from lightning_kd.objective.term import (
    LAYER_MAPS,
    TERMS,
    Features,
    KnowledgeTerm,
    ModelInfo,
    Needs,
    register_term,
    resolve_layer_map,
)
from lightning_kd.objective.terms import (
    AttentionMap,
    Embeddings,
    HiddenState,
    PredictionKL,
    Relations,
    TaskLoss,
    relation_log_probs,
)

__all__ = [
    "IGNORE_INDEX",
    "LAYER_MAPS",
    "PREDICTION_POSITIONS",
    "TERMS",
    "TOKEN_LOSSES",
    "AttentionMap",
    "DistillationObjective",
    "Embeddings",
    "Features",
    "HiddenState",
    "KnowledgeTerm",
    "ModelInfo",
    "Needs",
    "NextTokenDistillation",
    "PredictionKL",
    "Relations",
    "TaskLoss",
    "build_term",
    "chunked_cross_entropy",
    "chunked_token_loss",
    "prediction_kl",
    "prediction_mse",
    "prediction_positions",
    "register_term",
    "relation_log_probs",
    "resolve_layer_map",
    "token_divergence",
]
