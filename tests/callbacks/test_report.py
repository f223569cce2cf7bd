"""DistillationReport's lines: the layers in number order, and zero printed as 0.0000."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from lightning_kd.callbacks.report import (
    DistillationReport,
    ModelSize,
    discrepancy_lines,
    format_discrepancy,
    natural_key,
    size_lines,
)


def test_layers_sort_by_number_and_the_mean_comes_before_them() -> None:
    keys = [f"discrepancy/hidden/layer_{i}" for i in (1, 10, 11, 12, 2, 3, 4, 5, 6, 7, 8, 9)]
    keys += ["discrepancy/kl", "discrepancy/hidden"]
    assert sorted(keys, key=natural_key) == [
        "discrepancy/hidden",
        *(f"discrepancy/hidden/layer_{i}" for i in range(1, 13)),
        "discrepancy/kl",
    ]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (-0.0, "0.0000"),
        (-3e-6, "0.0000"),  # 1 - CKA of a copied layer, just past 1 by rounding
        (-4.9e-5, "0.0000"),
        (0.0, "0.0000"),
        (2e-5, "0.0000"),
        (0.12345, "0.1235"),
        (-0.01, "-0.0100"),  # a clearly negative value is not hidden
    ],
)
def test_values_that_print_as_zero_print_without_a_sign(value: float, shown: str) -> None:
    assert format_discrepancy(value) == shown


def test_a_metric_missing_at_the_start_prints_nan() -> None:
    (line,) = discrepancy_lines({}, {"discrepancy/kl": 0.5})
    assert "start nan" in line and "end 0.5000" in line


def test_the_report_prints_layers_in_order_and_copies_as_zero(capsys: pytest.CaptureFixture) -> None:
    report = DistillationReport()
    report.start = {
        "discrepancy/hidden": 0.2,
        **{f"discrepancy/hidden/layer_{i}": -0.0 for i in range(1, 13)},
    }
    report.end = {"discrepancy/hidden": 0.1, **{f"discrepancy/hidden/layer_{i}": -1e-7 for i in range(1, 13)}}
    report._print_and_export(trainer=None, pl_module=SimpleNamespace())
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("teacher-student discrepancy")
    names = [line.split()[0] for line in lines[1:]]
    assert names == ["discrepancy/hidden", *(f"discrepancy/hidden/layer_{i}" for i in range(1, 13))]
    assert "-0.0000" not in "\n".join(lines)
    assert lines[2].split()[1:] == ["start", "0.0000", "end", "0.0000"]


def test_sizes_of_a_distillation_and_of_a_single_model(capsys: pytest.CaptureFixture) -> None:
    teacher, student = torch.nn.Linear(100, 100), torch.nn.Linear(100, 50)
    assert size_lines(SimpleNamespace(teacher=teacher, student=student)) == [
        "teacher: Linear, 0.01M parameters",
        "student: Linear, 0.01M parameters (50% of the teacher)",
    ]

    class FineTuned(L.LightningModule):  # one trained model inside the LightningModule, as FineTuningModule
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Linear(1000, 1000)

    ModelSize().on_fit_start(trainer=None, pl_module=FineTuned())
    assert capsys.readouterr().out == "model: Linear, 1.00M parameters\n"
