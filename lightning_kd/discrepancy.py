"""How far the student is from the teacher, in numbers that mean the same for any two models.

- ``discrepancy/kl``: KL(teacher || student) of the predictions at temperature 1, where both models predict
  (on MLM's masked positions, or per example for a classifier).
- ``discrepancy/hidden/layer_<m>``: 1 - linear CKA (Kornblith et al., 2019) between student layer ``m`` and
  its teacher layer under the uniform map, over the real (non-padding) tokens of the batch. CKA compares
  representations of any two widths and ignores rotation and scale, so it is defined before a projection has
  learned anything, and for students of any width; 0 means the same representation up to rotation and scale.
- ``discrepancy/hidden``: the mean over layers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .objective import Features, prediction_kl, resolve_layer_map


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA of two sets of row vectors (n, d1) and (n, d2); 1 when they agree up to rotation and scale."""
    x = x.float() - x.float().mean(0, keepdim=True)
    y = y.float() - y.float().mean(0, keepdim=True)
    cross = (y.T @ x).pow(2).sum()
    norms = (x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()
    return cross / norms.clamp_min(torch.finfo(norms.dtype).tiny)


@torch.no_grad()
def measure_discrepancy(
    teacher: Features, student: Features, batch: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The discrepancy metrics for one batch (see the module docstring)."""
    out: dict[str, Tensor] = {}
    if (
        teacher.logits is not None
        and student.logits is not None
        and teacher.logits.shape == student.logits.shape
    ):
        out["discrepancy/kl"] = prediction_kl(teacher.logits, student.logits, batch, temperature=1.0)
    if teacher.hidden_states is not None and student.hidden_states is not None:
        mask = batch["attention_mask"].bool()
        pairs = resolve_layer_map(
            "uniform", len(student.hidden_states) - 1, len(teacher.hidden_states) - 1, with_embeddings=False
        )
        per_layer = []
        for s_layer, t_layer in pairs:
            value = 1.0 - linear_cka(
                student.hidden_states[s_layer][mask], teacher.hidden_states[t_layer][mask]
            )
            out[f"discrepancy/hidden/layer_{s_layer}"] = value
            per_layer.append(value)
        out["discrepancy/hidden"] = torch.stack(per_layer).mean()
    return out
