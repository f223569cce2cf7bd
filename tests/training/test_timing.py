"""Step accounting: the parts of a step add up, nested sections are not counted twice, tokens are real tokens."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from kd_helpers import FixedBatches, make_batch, quiet_trainer
from lightning.pytorch.loggers import CSVLogger
from transformers import BertForMaskedLM

from lightning_kd import DistillationModule, PruningCallback
from lightning_kd.training import timing as timing_module
from lightning_kd.training.timing import StepTimer


class ScriptedClock:
    """A clock that reads whatever the test sets, so the accounting is checked without timing anything."""

    def __init__(self) -> None:
        self.now = 0.0

    def mark(self) -> float:
        return self.now

    @staticmethod
    def elapsed_ms(start: float, end: float) -> float:
        return (end - start) * 1000.0

    def settle(self) -> None:
        return None


def scripted_timer(monkeypatch: pytest.MonkeyPatch) -> tuple[StepTimer, ScriptedClock]:
    """A StepTimer whose section marks and interval wall clock both read ``clock.now``."""
    clock = ScriptedClock()
    monkeypatch.setattr(timing_module.time, "perf_counter", lambda: clock.now)
    timer = StepTimer()
    timer.clock = clock
    timer.reset()
    return timer, clock


def test_sections_nest_and_add_up_to_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    timer, clock = scripted_timer(monkeypatch)
    batch = make_batch(batch_size=4, seq=10)
    for _ in range(2):
        start = clock.now
        clock.now = start + 0.010  # data loading: 10 ms
        with timer.section("teacher_forward"):
            clock.now += 0.020
        with timer.section("student_forward"):
            clock.now += 0.030
            with timer.section("filters"):  # inside the student's share: counted once, as filters
                clock.now += 0.005
        timer.start("student_backward")
        clock.now += 0.040
        timer.stop("student_backward")
        timer.start("optimizer")
        with timer.section("pruning"):
            clock.now += 0.003
        clock.now += 0.007
        timer.stop("optimizer")
        timer.count(batch)
        timer.end_step()
    summary = timer.summary()
    expected = {
        "teacher_forward": 20,
        "student_forward": 30,
        "filters": 5,
        "student_backward": 40,
        "optimizer": 7,
        "pruning": 3,
        "step": 115,
        "other": 10,
    }
    for name, value in expected.items():
        assert summary[f"time/{name}_ms"] == pytest.approx(value), name
    real_tokens = int(batch["attention_mask"].sum())  # padding is not throughput
    assert real_tokens < batch["input_ids"].numel()
    assert summary["throughput/tokens_per_s"] == pytest.approx(2 * real_tokens / 0.230)
    assert summary["throughput/samples_per_s"] == pytest.approx(8 / 0.230)
    # a new interval starts empty
    clock.now += 0.1
    timer.end_step()
    assert timer.summary()["time/step_ms"] == pytest.approx(100)


def test_paused_time_is_not_step_time(monkeypatch: pytest.MonkeyPatch) -> None:
    timer, clock = scripted_timer(monkeypatch)
    clock.now = 0.05
    timer.pause()
    clock.now = 1.05  # a validation run
    timer.resume()
    clock.now = 1.10
    timer.end_step()
    assert timer.summary()["time/step_ms"] == pytest.approx(100)


def _read_metrics(folder: Path) -> list[dict[str, str]]:
    (path,) = folder.rglob("metrics.csv")
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_fit_logs_the_split_and_tokens_per_second(
    teacher: BertForMaskedLM, tmp_path: Path, accumulate: int
) -> None:
    torch.manual_seed(0)
    module = DistillationModule(teacher, {"init": "copy"}, objective=[{"term": "hidden"}, {"term": "logits"}])
    trainer = quiet_trainer(
        max_steps=6,
        log_every_n_steps=2,
        logger=CSVLogger(tmp_path),
        accumulate_grad_batches=accumulate,
        callbacks=[PruningCallback({"ffn": 0.5}, interval=2)],
    )
    data = FixedBatches(num_batches=4)
    trainer.fit(module, data)
    rows = [row for row in _read_metrics(tmp_path) if row.get("time/step_ms")]
    assert len(rows) == 3
    parts = ("teacher_forward", "student_forward", "student_backward", "optimizer", "pruning", "other")
    tokens_per_batch = sum(int(b["attention_mask"].sum()) for b in data.batches) / len(data.batches)
    for row in rows:
        values = {name: float(row[f"time/{name}_ms"]) for name in (*parts, "step")}
        # every section was timed (the pruning callback scores importance at every step) ...
        assert all(values[p] > 0 for p in parts if p != "other"), values
        # ... and none counted twice: `other` is the rest of the step, which its floor at 0 would hide
        measured = sum(values[p] for p in parts if p != "other")
        assert measured <= values["step"] * (1 + 1e-6), values
        assert values["other"] == pytest.approx(values["step"] - measured, abs=1e-3)  # logged as float32
        # tokens per second times seconds per optimizer step gives the tokens each optimizer step consumed
        per_step = float(row["throughput/tokens_per_s"]) * values["step"] / 1000
        assert per_step == pytest.approx(accumulate * tokens_per_batch, rel=1e-6)
        assert not math.isnan(float(row["throughput/samples_per_s"]))


def test_timing_can_be_switched_off(teacher: BertForMaskedLM, tmp_path: Path) -> None:
    module = DistillationModule(teacher, {"init": "layers", "num_layers": 2}, time_steps=False)
    trainer = quiet_trainer(max_steps=2, log_every_n_steps=1, logger=CSVLogger(tmp_path))
    trainer.fit(module, FixedBatches())
    assert not [k for k in trainer.logged_metrics if k.startswith(("time/", "throughput/"))]
    assert "train/loss" in trainer.logged_metrics
