"""Under DDP every rank takes the guard's decision together, even when only one rank's loss is bad."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kd_helpers import run_ranks_script

SCRIPT = Path(__file__).with_name("ddp_nonfinite_run.py")


def run(tmp_path: Path, policy: str) -> tuple[dict, dict]:
    run_ranks_script(SCRIPT, tmp_path, str(tmp_path), policy)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    return rank0, rank1


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_one_bad_rank_makes_every_rank_skip_or_stop_together(tmp_path: Path, policy: str) -> None:
    rank0, rank1 = run(tmp_path, policy)
    if policy == "skip":
        assert rank0["skipped"] == rank1["skipped"] == [3]
        assert rank0["step"] == rank1["step"] == 5 and not rank0["stopped"]
    else:
        # decided on the device and read at the end of training (no logging step before it): the updates of
        # step 3 and of every later step were skipped on both ranks
        assert rank0["step"] == rank1["step"] == 5
        for rank in (rank0, rank1):
            assert all(torch.equal(v, rank["student_at_2"][k]) for k, v in rank["student"].items())
        assert "optimizer step 3: on another rank" in rank0["stopped"]
        assert "optimizer step 3: terms not finite: nan_on_rank_one = nan" in rank1["stopped"]
    for name, value in rank0["student"].items():
        assert torch.isfinite(value).all(), name
        assert torch.equal(value, rank1["student"][name]), name
