"""ShrinkStrategy and MaskStrategy, driven by hand through the same events: the same student, the same size."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from kd_helpers import make_batch
from transformers import BertForMaskedLM

from lightning_kd import DistillationModule
from lightning_kd.pruning.importance import PlatonImportance, top_units
from lightning_kd.pruning.strategies import MaskStrategy, ShrinkStrategy
from lightning_kd.pruning.units import full_masks, unit_counts

OBJECTIVE = [{"term": "logits", "temperature": 2.0}, {"term": "hidden", "layers": "uniform"}]
KINDS = ("heads", "ffn", "hidden")


def events() -> list[dict[str, torch.Tensor]]:
    """Two nested events from full shapes (4 heads, 32 neurons, 16 dimensions): to 3/20/12, then 2/8/8."""
    generator = torch.Generator().manual_seed(7)
    full = {"heads": torch.ones(4, 4, dtype=torch.bool), "ffn": torch.ones(4, 32, dtype=torch.bool)}
    full["hidden"] = torch.ones(16, dtype=torch.bool)
    scores = {kind: torch.rand(mask.shape, generator=generator) for kind, mask in full.items()}
    out = [full]
    for keep in ({"heads": 3, "ffn": 20, "hidden": 12}, {"heads": 2, "ffn": 8, "hidden": 8}):
        last = out[-1]
        out.append(
            {k: top_units(scores[k].masked_fill(~last[k], -torch.inf), keep[k]) & last[k] for k in KINDS}
        )
    return out


def test_both_strategies_produce_the_same_student(teacher: BertForMaskedLM) -> None:
    masks = events()
    trainer = SimpleNamespace(optimizers=[], strategy=SimpleNamespace(model=None))  # no optimizer, no DDP
    results = []
    for strategy in (ShrinkStrategy(PlatonImportance(kinds=list(KINDS))), MaskStrategy()):
        torch.manual_seed(0)
        module = DistillationModule(teacher, {"init": "copy"}, objective=OBJECTIVE)
        with torch.no_grad():  # a student that has moved away from its teacher
            for parameter in module.student.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
        sizes = [strategy.begin(module, masks[0])]
        sizes += [
            strategy.apply(trainer, module, old, new) for old, new in zip(masks, masks[1:], strict=False)
        ]
        if strategy.physical:  # the student really is that small after every event
            assert unit_counts(module.student)["hidden"] == 8
        student = strategy.finish(module, masks[-1])
        results.append((module, student, sizes))
    (shrunk, shrunk_student, shrunk_sizes), (masked, masked_student, masked_sizes) = results
    assert shrunk_sizes == masked_sizes and shrunk_sizes[0] > shrunk_sizes[1] > shrunk_sizes[2]
    assert unit_counts(masked_student) == unit_counts(shrunk_student)
    assert sum(p.numel() for p in shrunk_student.parameters()) == shrunk_sizes[-1]
    expected, actual = masked.state_dict(), shrunk.state_dict()
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        assert torch.allclose(value, actual[name], atol=1e-6), name
    batch = make_batch(seed=3)
    for module in (shrunk, masked):
        module.eval()
    shrunk_terms = shrunk.objective(shrunk.teacher_features(batch), shrunk.student_features(batch), batch)[1]
    masked_terms = masked.objective(masked.teacher_features(batch), masked.student_features(batch), batch)[1]
    for name, value in masked_terms.items():
        assert torch.allclose(value, shrunk_terms[name], atol=1e-5), name


def test_masks_zero_weights_and_gradients_that_shrinking_removes(teacher: BertForMaskedLM) -> None:
    masks = events()
    module = DistillationModule(teacher, {"init": "copy"}, objective=OBJECTIVE)
    strategy = MaskStrategy()
    strategy.begin(module, masks[0])
    assert strategy.slices == []  # nothing masked yet
    strategy.apply(None, module, masks[0], masks[1])
    assert strategy.slices and unit_counts(module.student) == unit_counts(teacher)  # shapes stay
    for parameter in module.student.parameters():
        parameter.grad = torch.ones_like(parameter)
    strategy.before_optimizer_step()
    for parameter, dim, index in strategy.slices:
        assert parameter.index_select(dim, index).abs().max() == 0
        assert parameter.grad.index_select(dim, index).abs().max() == 0
    # scores of a shrunk student are put back where the units sit in the full shape; removed ones rank last
    kept = masks[1]["ffn"]
    scores = ShrinkStrategy(PlatonImportance()).scores(
        {"ffn": torch.arange(80.0).reshape(4, 20)}, {"ffn": kept}
    )
    assert scores["ffn"].shape == (4, 32) and torch.isinf(scores["ffn"][~kept]).all()
    assert torch.equal(scores["ffn"][kept], torch.arange(80.0))
    assert full_masks(module.student)["hidden"].all()
