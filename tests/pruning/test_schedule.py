"""PruningSchedule without a Trainer: the cubic schedule's counts, rounding to a granularity, end_step as a
share of the run, the steps events fall on, and its refusals."""

from __future__ import annotations

import pickle

import pytest

from lightning_kd import PruningCallback
from lightning_kd.pruning.schedule import PruningSchedule

FULL = {"heads": 12, "ffn": 3072, "hidden": 768}  # BERT-base, per layer for heads and FFN
HALF = {"heads": 0.5, "ffn": 0.5, "hidden": 0.5}


def laid_out(target: dict = HALF, last: int = 100, **options: object) -> PruningSchedule:
    schedule = PruningSchedule(**options)
    schedule.set_counts(FULL, target)
    schedule.resolve_end(last)
    return schedule


def test_cubic_keep_counts_at_known_steps() -> None:
    schedule = laid_out(end_step=100, interval=10)
    assert schedule.goal == {"heads": 6, "ffn": 1536, "hidden": 384}
    assert schedule.keep_counts(0) == FULL
    # step 25: 1 - 0.75³ = 0.578125 of the way; step 50: 0.875 of the way
    assert schedule.keep_counts(25) == {"heads": 9, "ffn": 2184, "hidden": 546}
    assert schedule.keep_counts(50) == {"heads": 7, "ffn": 1728, "hidden": 432}
    assert schedule.keep_counts(100) == schedule.goal
    assert schedule.keep_counts(150) == schedule.goal  # past the end: stays at the target
    assert schedule(0.5) == pytest.approx(0.875)
    # a count target, the other shapes, and a start that delays the schedule
    linear = laid_out({"heads": 4}, start_step=20, end_step=60, interval=5, shape="linear")
    assert [linear.keep_counts(s)["heads"] for s in (0, 20, 30, 40, 60)] == [12, 12, 10, 8, 4]
    once = laid_out({"ffn": 0.25}, end_step=50, shape="one-shot")
    assert once.keep_counts(0)["ffn"] == 3072 and once.keep_counts(1)["ffn"] == 768


def test_granularity_rounds_up_never_below_the_target_and_ends_on_it() -> None:
    # 30% of the FFN is 922 neurons, not a multiple of 64: every other count is one
    schedule = laid_out(
        {"ffn": 0.3, "hidden": 0.5}, end_step=40, interval=1, granularity={"ffn": 64, "hidden": 64}
    )
    rows = [schedule.keep_counts(step) for step in range(41)]
    for kind, goal in (("ffn", 922), ("hidden", 384)):
        counts = [row[kind] for row in rows]
        assert counts[-1] == goal and counts[0] == FULL[kind]
        assert all(count >= goal for count in counts)
        assert all(count % 64 == 0 for count in counts[:-1] if count != goal)
        assert counts == sorted(counts, reverse=True)  # never grows back
    assert min(row["ffn"] for row in rows if row["ffn"] > 922) == 960  # the multiple just above the target
    # without rounding the same schedule passes through many more widths
    plain = laid_out({"ffn": 0.3}, end_step=40, interval=1)
    assert len({plain.keep_counts(s)["ffn"] for s in range(41)}) > len({row["ffn"] for row in rows})


@pytest.mark.parametrize(
    ("end_step", "start_step", "last", "expected"),
    [(0.75, 0, 8, 6), (0.75, 0, 4, 3), (0.75, 0, 2, 2), (0.1, 3, 10, 4), (None, 0, 7, 7), (5, 0, 9, 5)],
)
def test_end_step_resolves_against_the_run(
    end_step: float | int | None, start_step: int, last: int, expected: int
) -> None:
    schedule = PruningSchedule(start_step=start_step, end_step=end_step, interval=1)
    assert schedule.resolve_end(last) == expected == schedule.end_step


def test_events_fall_every_interval_and_at_the_end() -> None:
    schedule = laid_out({"heads": 0.5}, start_step=1, end_step=11, interval=3, last=20)
    due = [step for step in range(25) if schedule.is_due(step)]
    assert due == schedule.event_steps() == [4, 7, 10, 11]
    assert laid_out(end_step=10, interval=5).event_steps() == [5, 10]
    # the widths the relation-heads check sees: every count on the way, the full and the target ones included
    linear = laid_out({"heads": 0.5}, end_step=6, interval=1, shape="linear")
    assert linear.counts_passed("heads") == [6, 7, 8, 9, 10, 11, 12]
    assert laid_out({"heads": 0.5}, end_step=6, interval=1, shape="one-shot").counts_passed("heads") == [
        6,
        12,
    ]


def test_bad_schedules_are_refused_with_the_callbacks_messages() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'cosine': use one of cubic, linear, one-shot"):
        PruningSchedule(shape="cosine")
    with pytest.raises(ValueError, match="interval must be >= 1 and start_step >= 0, got 0 and 0"):
        PruningSchedule(interval=0)
    with pytest.raises(ValueError, match="granularity \\{'layers': 2\\} is invalid"):
        PruningSchedule(granularity={"layers": 2})
    with pytest.raises(ValueError, match="keeps 0 of 12 heads units; the student can keep between 1 and 12"):
        laid_out({"heads": 0})
    with pytest.raises(ValueError, match="ends at step 12, after the run's last step 10"):
        PruningSchedule(end_step=12).resolve_end(10)
    with pytest.raises(ValueError, match="end_step \\(3\\) must come after start_step \\(3\\)"):
        PruningSchedule(start_step=3, end_step=3).resolve_end(10)
    # the callback refuses the same, before any training
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        PruningCallback(HALF, schedule="cosine")


def test_the_callback_delegates_and_keeps_its_checkpoint_layout() -> None:
    pruning = PruningCallback(HALF, start_step=2, end_step=0.5, interval=4, granularity={"hidden": 64})
    assert pruning.end_step == 0.5  # as given, until the run's length is known
    pruning.schedule.set_counts(FULL, HALF)
    pruning.schedule.resolve_end(40)
    assert pruning.end_step == 20
    assert pruning.keep_counts(10) == pruning.schedule.keep_counts(10)
    assert set(pruning.pruning_state()) == {
        "target",
        "masks",
        "importance",
        "last_event",
        "events",
        "end_step",
        "physical",
    }
    assert pruning.pruning_state()["end_step"] == 20
    # ddp_spawn pickles the schedule with the callback
    restored = pickle.loads(pickle.dumps(pruning))
    assert restored.keep_counts(10) == pruning.keep_counts(10) and restored.schedule(0.5) == pytest.approx(
        0.875
    )
