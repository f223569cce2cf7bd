"""How far the student is from the teacher, in numbers that mean the same for any two models.

- ``discrepancy/kl``: KL(teacher || student) of the predictions at temperature 1, where both models predict
  (on MLM's masked positions, or per example for a classifier); ``discrepancy/mse`` instead for one-output
  regression heads (STS-B), the mean squared difference of the two scores, as a KL of one class is always 0.
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

from lightning_kd.objective.predictions import prediction_kl, prediction_mse
from lightning_kd.objective.term import Features, resolve_layer_map


def linear_cka(x: Tensor, y: Tensor, weights: Tensor | None = None) -> Tensor:
    """Linear CKA of two sets of row vectors (n, d1) and (n, d2); 1 when they agree up to rotation and scale.

    ``weights`` (n,) of 0/1 keeps only some rows: rows weighted 0 are centred away and then zeroed, which gives
    the CKA of the kept rows alone without boolean indexing (that would wait for a GPU to count them).
    """
    x, y = x.float(), y.float()
    if weights is None:
        x = x - x.mean(0, keepdim=True)
        y = y - y.mean(0, keepdim=True)
    else:
        w = weights.to(x.dtype)[:, None]
        count = w.sum().clamp_min(1.0)
        x = (x - (x * w).sum(0, keepdim=True) / count) * w
        y = (y - (y * w).sum(0, keepdim=True) / count) * w
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
        if teacher.logits.shape[-1] == 1:
            out["discrepancy/mse"] = prediction_mse(teacher.logits, student.logits, batch, student.positions)
        else:
            out["discrepancy/kl"] = prediction_kl(
                teacher.logits,
                student.logits,
                batch,
                temperature=1.0,
                positions=student.positions,
                spans=student.spans,
            )
    if teacher.hidden_states is not None and student.hidden_states is not None:
        mask = batch["attention_mask"].reshape(-1)
        pairs = resolve_layer_map(
            "uniform", len(student.hidden_states) - 1, len(teacher.hidden_states) - 1, with_embeddings=False
        )
        per_layer = []
        for s_layer, t_layer in pairs:
            s_states, t_states = student.hidden_states[s_layer], teacher.hidden_states[t_layer]
            value = 1.0 - linear_cka(
                s_states.reshape(-1, s_states.shape[-1]), t_states.reshape(-1, t_states.shape[-1]), mask
            )
            out[f"discrepancy/hidden/layer_{s_layer}"] = value
            per_layer.append(value)
        out["discrepancy/hidden"] = torch.stack(per_layer).mean()
    return out
