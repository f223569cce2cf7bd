"""Distillation and HomoDistil pruning on FSDP2 (2 CPU processes, gloo) compute what DDP computes: the same
student, the same AdamW moments and step, the same pruning events, with every rank holding the same student.
One launch of two processes runs DDP and two FSDP2 variants in turn (starting processes is most of the cost)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("fsdp_run.py")
CASES = ("ddp", "fsdp", "fsdp_replicated")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *CASES],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=out,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {
        case: [torch.load(out / case / f"rank{r}.pt", weights_only=False) for r in (0, 1)] for case in CASES
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", ["fsdp", "fsdp_replicated"])
def test_fsdp2_trains_and_prunes_as_ddp_does(runs: dict[str, list[dict]], case: str) -> None:
    ddp, (rank0, rank1) = runs["ddp"][0], runs[case]
    # the student really was sharded; the teacher as asked
    assert set(rank0["sharded"]) == {"DTensor"}
    assert set(rank0["teacher_sharded"]) == ({"DTensor"} if case == "fsdp" else {"Parameter"})
    # three events shrank the student physically, the same as under DDP
    assert [e["step"] for e in rank0["events"]] == [2, 4, 6]
    assert rank0["events"] == rank1["events"] == ddp["events"]
    assert [e["params"] for e in rank0["events"]] == sorted(
        (e["params"] for e in rank0["events"]), reverse=True
    )
    # the ranks hold the same student, bit for bit, and it is DDP's to float tolerance
    assert rank0["student"].keys() == ddp["student"].keys()
    for name, value in rank0["student"].items():
        assert torch.equal(value, rank1["student"][name]), name
        assert value.shape == ddp["student"][name].shape, name
        assert torch.allclose(value, ddp["student"][name], atol=1e-6), name
    # the AdamW moments followed the kept units, and the step count carried over the events
    for name, state in ddp["moments"].items():
        assert rank0["moments"][name].keys() == state.keys(), name
        for key, value in state.items():
            assert torch.allclose(rank0["moments"][name][key], value, atol=1e-6), (name, key)
    assert int(rank0["moments"]["bert.embeddings.word_embeddings.weight"]["step"]) == 8
